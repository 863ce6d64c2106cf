"""Certified-robust training through Classifier(certificate_weight=...): the certificate term works."""

import pytest
import pytorch_lightning as pl
import torch

from lightning_robust.certify import simplex_certificate
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.models import Classifier
from lightning_robust.nets import MLP
from lightning_robust.utils import safe_load


def _fit(tmp_path, weight: float, method: str = "simplex") -> tuple[Classifier, pl.Trainer]:
    pl.seed_everything(0)
    model = Classifier(MLP(64, 10, (32,)), certificate_weight=weight, certificate_method=method,
                       certificate_radius=1.0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
                         deterministic=True)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, seed=0))
    return model.eval(), trainer


def _hinge_by_hand(W1, b1, W2, b2, x, y, radius, topk):
    """Singla & Feizi's simplex facets for a one-hidden-layer ReLU net, with the MMR-style hinge, by hand.

    Facets of the activation region: the hidden hyperplanes, at distance |W1_i x + b1_i| / ||W1_i||. Inside the
    region the logits are affine with Jacobian J = W2 diag(a) W1 (a = 1[z > 0]); the distance to the
    linearized boundary between y and j is (z_y - z_j) / ||J_y - J_j||, minimized over j != y.
    """
    losses, certs = [], []
    for xb, yb in zip(x.flatten(1), y.tolist()):
        z = W1 @ xb + b1
        facet = z.abs() / W1.norm(dim=1)
        J = W2 @ torch.diag((z > 0).to(xb.dtype)) @ W1
        logits = W2 @ torch.relu(z) + b2
        lin = min((logits[yb] - logits[j]) / (J[yb] - J[j]).norm() for j in range(len(logits)) if j != yb)
        lin = torch.clamp(lin, min=-10 * radius)  # the surrogate caps misclassified samples' hinge
        near = facet.sort().values[:topk]
        losses.append(torch.relu(1 - lin / radius) + torch.relu(1 - near / radius).mean())
        certs.append(torch.minimum(facet.min(), lin))
    return torch.stack(losses).mean(), torch.stack(certs)


def test_certified_training_term_is_its_formula(digits_tensors):
    # training_loss = CE + w · hinge, with the hinge and the logged certificate checked against the
    # closed form of a one-hidden-layer net (no library certificate code in the reference).
    torch.manual_seed(0)
    x, y = digits_tensors[0][:12].double(), digits_tensors[1][:12]
    net = MLP(64, 10, (16,)).double()
    model = Classifier(net, certificate_weight=0.7, certificate_radius=0.3, certificate_topk=4)
    loss, _, extra = model.training_loss(x, y)
    W1, b1 = net.layers[1].weight, net.layers[1].bias
    W2, b2 = net.layers[3].weight, net.layers[3].bias
    hinge, certs = _hinge_by_hand(W1, b1, W2, b2, x, y, 0.3, 4)
    ce = torch.nn.functional.cross_entropy(net(x), y)
    assert loss.item() == pytest.approx((ce + 0.7 * hinge).item(), rel=1e-9)
    assert extra["certificate_loss"].item() == pytest.approx(hinge.item(), rel=1e-9)
    assert extra["certificate"].item() == pytest.approx(certs.clamp_min(0).mean().item(), rel=1e-9)
    assert (certs < 0).any() and (certs > 0).any()  # both branches of the signed margin occur
    # The term is differentiable and its weight gradient is the formula's.
    grad = torch.autograd.grad(loss, [W1, W2])
    expected = torch.autograd.grad(ce + 0.7 * hinge, [W1, W2])
    for g, e in zip(grad, expected):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10)


def test_lipschitz_training_term_is_its_formula(digits_tensors):
    # Global-Lipschitz baseline: r = min_{j != y} (z_y - z_j) / (||W2_y - W2_j|| · ||W1||_2) for a
    # one-hidden-layer ReLU net (ReLU is 1-Lipschitz), and the term is mean relu(1 - r / R).
    torch.manual_seed(0)
    x, y = digits_tensors[0][:12].double(), digits_tensors[1][:12]
    net = MLP(64, 10, (16,)).double()
    model = Classifier(net, certificate_weight=0.7, certificate_method="lipschitz", certificate_radius=0.3)
    loss, _, extra = model.training_loss(x, y)
    W1, W2 = net.layers[1].weight.detach(), net.layers[3].weight.detach()
    spectral = torch.linalg.matrix_norm(W1, ord=2)
    z = net(x).detach()
    radii = torch.stack([
        min((z[b, y[b]] - z[b, j]) / ((W2[y[b]] - W2[j]).norm() * spectral) for j in range(10) if j != y[b])
        for b in range(len(y))])
    term = torch.relu(1 - radii / 0.3).mean()
    ce = torch.nn.functional.cross_entropy(net(x), y)
    assert (radii < 0).any() and (radii > 0).any()  # both signs of the margin occur
    assert extra["certificate_loss"].item() == pytest.approx(term.item(), rel=1e-8)
    assert extra["certificate"].item() == pytest.approx(radii.clamp_min(0).mean().item(), rel=1e-8)
    assert loss.item() == pytest.approx((ce + 0.7 * term).item(), rel=1e-8)


def test_certificate_term_enlarges_certified_radii(tmp_path, digits_tensors):
    x, _ = digits_tensors
    x = x[1400:1500]
    plain, _ = _fit(tmp_path / "plain", 0.0)
    robust, trainer = _fit(tmp_path / "robust", 1.0)
    assert {"train/certificate", "train/certificate_loss"} <= set(trainer.callback_metrics)
    r_plain = simplex_certificate(plain.net, x).mean()
    r_robust = simplex_certificate(robust.net, x).mean()
    assert r_robust > 1.5 * r_plain
    ckpt = next((tmp_path / "robust" / "checkpoints").glob("*.ckpt"))
    hp = safe_load(ckpt)["hyper_parameters"]  # primitives only: loads with weights_only=True
    assert hp["certificate_weight"] == 1.0 and hp["certificate_method"] == "simplex"


def test_lipschitz_method_and_argument_checks(tmp_path):
    _, trainer = _fit(tmp_path, 1.0, "lipschitz")
    assert float(trainer.callback_metrics["train/certificate"]) > 0
    with pytest.raises(ValueError, match="certificate_weight"):
        Classifier(MLP(64, 10), certificate_weight=-1.0)
    with pytest.raises(ValueError, match="certificate_method"):
        Classifier(MLP(64, 10), certificate_method="decision_boundary")
    with pytest.raises(ValueError, match="certificate_radius"):
        Classifier(MLP(64, 10), certificate_radius=0.0)
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
