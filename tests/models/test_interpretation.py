"""InterpretationRegularizedClassifier: the penalty, double backpropagation, checkpoints, and 2-process DDP."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_robust.attacks import PGD, Attack, ThreatModel
from lightning_robust.callbacks import SaliencyCertification
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.interpret import TopKSaliencyAttack, gradient_saliency, topk_intersection
from lightning_robust.metrics import TopKIntersection
from lightning_robust.models import InterpretationRegularizedClassifier
from lightning_robust.models.interpretation import saliency_difference
from lightning_robust.nets import MLP, SmallCNN
from lightning_robust.utils import safe_load
from tests.helpers.ddp import RankGather, ddp_trainer


class FixedShift(Attack):
    """A parameter-free 'attack': x + a fixed perturbation, clipped (makes the loss a plain function of θ)."""

    def __init__(self, delta):
        super().__init__(ThreatModel("l2", 10.0))
        self.delta = delta

    def perturb(self, model, x, y, generator):
        return (x + self.delta[: x.shape[0]].to(x)).clamp(0, 1)


def _flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_penalty_definition_and_double_backprop_matches_finite_differences():
    torch.manual_seed(0)
    net = MLP(64, 10, (16, 16)).double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64) * 0.8 + 0.1
    y = torch.randint(0, 10, (6,))
    shift = FixedShift(0.05 * torch.randn(6, 1, 8, 8, dtype=torch.float64))
    model = InterpretationRegularizedClassifier(net, saliency_weight=50.0, interpretation_attack=shift)
    loss, _, extra = model.training_loss(x, y)
    cls = net(x).argmax(1)
    x2 = shift(net, x, y)
    expected_pen = saliency_difference(gradient_saliency(net, x, cls), gradient_saliency(net, x2, cls)).mean()
    assert extra["saliency_penalty"].item() == pytest.approx(expected_pen.item(), rel=1e-10)
    assert loss.item() == pytest.approx((F.cross_entropy(net(x), y) + 50.0 * expected_pen).item(), rel=1e-10)
    # The penalty's weight-gradient (through the saliency maps, a ReLU net) is non-zero and exact.
    model.zero_grad()
    loss.backward()
    grad = _flat_grad(model)
    model.zero_grad()
    F.cross_entropy(net(x), y).backward()
    assert (grad - _flat_grad(model)).norm() > 1e-6
    u = torch.randn_like(grad)
    params = list(model.parameters())

    def loss_at(t):
        with torch.no_grad():
            offset = 0
            for p in params:
                p.add_(t * u[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        value = model.training_loss(x, y)[0].item()
        with torch.no_grad():
            offset = 0
            for p in params:
                p.sub_(t * u[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        return value

    h = 1e-6
    fd = (loss_at(h) - loss_at(-h)) / (2 * h)
    assert fd == pytest.approx(float(grad @ u), rel=1e-5)


def _written_out_penalty(net, x, x_pert, cls):
    """The paper's penalty from its definition, sample by sample, with no library helper.

    For each sample b: g = ∂z_c/∂x at x_b and g' at x'_b (c the class predicted at x_b), both taken as |g|
    and scaled to unit L2 norm over all pixels, then the mean over pixels of the squared difference.
    """
    per_sample = []
    for b in range(x.shape[0]):
        maps = []
        for point in (x[b:b + 1], x_pert[b:b + 1]):
            point = point.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(net(point)[0, cls[b]], point)
            a = grad.abs().flatten()
            maps.append(a / torch.sqrt((a * a).sum()))
        per_sample.append(((maps[0] - maps[1]) ** 2).sum() / maps[0].numel())
    return torch.stack(per_sample).mean()


def test_penalty_is_the_papers_formula_written_out():
    # An independent reference (not saliency_difference, the function under test): the absolute value,
    # the unit normalization and the mean over pixels each change the number.
    torch.manual_seed(1)
    net = MLP(64, 10, (16, 16)).double()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64) * 0.8 + 0.1
    y = torch.randint(0, 10, (5,))
    shift = FixedShift(0.05 * torch.randn(5, 1, 8, 8, dtype=torch.float64))
    model = InterpretationRegularizedClassifier(net, saliency_weight=3.0, interpretation_attack=shift)
    loss, _, extra = model.training_loss(x, y)
    cls = net(x).argmax(1)
    expected = _written_out_penalty(net, x, shift(net, x, y), cls)
    assert extra["saliency_penalty"].item() == pytest.approx(expected.item(), rel=1e-10)
    assert loss.item() == pytest.approx((F.cross_entropy(net(x), y) + 3.0 * expected).item(), rel=1e-10)
    # The signed maps would give another number: the reference is sensitive to the |.| the paper takes.
    g = gradient_saliency(net, x, cls).flatten(1)
    g2 = gradient_saliency(net, shift(net, x, y), cls).flatten(1)
    signed = (F.normalize(g, dim=1) - F.normalize(g2, dim=1)).pow(2).mean(1).mean()
    assert abs(signed.item() - expected.item()) > 1e-3 * expected.item()


def test_attack_perturbation_and_adversarial_ce():
    torch.manual_seed(0)
    net = MLP(64, 10, (16,))
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    pgd = PGD(eps=0.1, alpha=0.05, steps=3, random_start=False)
    model = InterpretationRegularizedClassifier(net, saliency_weight=10.0, attack=pgd, perturbation="attack")
    _, logits, extra = model.training_loss(x, y)
    x_adv = pgd(net, x, y)
    assert torch.allclose(logits, net(x_adv))
    cls = net(x).argmax(1)
    pen = saliency_difference(gradient_saliency(net, x, cls), gradient_saliency(net, x_adv, cls)).mean()
    assert extra["saliency_penalty"].item() == pytest.approx(pen.item(), rel=1e-5)
    plain = InterpretationRegularizedClassifier(net, saliency_weight=0.0, attack=pgd)
    loss0, _, extra0 = plain.training_loss(x, y)
    assert extra0 == {} and loss0.item() == pytest.approx(F.cross_entropy(net(x_adv), y).item(), rel=1e-6)


class _BNNet(torch.nn.Module):
    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16),
                                        torch.nn.ReLU(), torch.nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


def test_penalty_forward_leaves_batchnorm_running_statistics_alone():
    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    model = InterpretationRegularizedClassifier(_BNNet(), saliency_weight=1.0)
    reference = _BNNet()
    reference.load_state_dict(model.net.state_dict())
    model.train()
    reference.train()
    model.training_loss(x, y)
    reference(x)  # what the cross-entropy forward alone does to the statistics
    bn, ref_bn = model.net.body[2], reference.body[2]
    assert torch.equal(bn.running_mean, ref_bn.running_mean) and torch.equal(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 1 and bn.momentum == ref_bn.momentum


def test_checkpoint_is_weights_only_and_arguments_are_checked(tmp_path):
    pl.seed_everything(0)
    model = InterpretationRegularizedClassifier(
        MLP(64, 10, (16,)), saliency_weight=5.0, attack=PGD(eps=0.1, steps=1),
        interpretation_attack=TopKSaliencyAttack(eps=0.5, steps=1, restarts=1, search_steps=2))
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    state = safe_load(next((tmp_path / "checkpoints").glob("*.ckpt")))
    hp = state["hyper_parameters"]
    assert hp["saliency_weight"] == 5.0 and hp["num_classes"] == 10 and hp["perturbation"] == "interpretation"
    assert "attack" not in hp and "interpretation_attack" not in hp
    with pytest.raises(ValueError, match="perturbation='attack' needs an attack"):
        InterpretationRegularizedClassifier(MLP(64, 10), perturbation="attack")
    with pytest.raises(ValueError, match="saliency_weight must be a non-negative number, got -1"):
        InterpretationRegularizedClassifier(MLP(64, 10), saliency_weight=-1)
    with pytest.raises(ValueError, match="perturbation must be one of"):
        InterpretationRegularizedClassifier(MLP(64, 10), perturbation="noise")
    with pytest.raises(TypeError, match="attack must be an Attack or None"):
        InterpretationRegularizedClassifier(MLP(64, 10), attack="pgd")


class MetricSync(pl.Callback):
    """Each rank feeds rank-specific maps to TopKIntersection; the synced value must be the global mean."""

    def __init__(self, path):
        self.path = str(path)

    @staticmethod
    def data(rank):
        g = torch.Generator().manual_seed(100 + rank)
        a = torch.randn(3 + rank, 1, 8, 8, generator=g)
        return a, a + torch.randn(a.shape, generator=g)

    def on_fit_end(self, trainer, pl_module):
        metric = TopKIntersection(k=16).to(pl_module.device)
        metric.update(*self.data(trainer.global_rank))
        value = metric.compute()  # synchronised across ranks (every rank must call it)
        overlaps = torch.cat([topk_intersection(*self.data(r), 16) for r in range(trainer.world_size)])
        if trainer.global_rank == 0:
            torch.save(torch.stack([value.cpu(), overlaps.float().mean() / 16]), self.path)


def _certified(trainer, module):
    names = [f"saliency/certified_topk@{r:g}" for r in (0.05, 0.1)]
    return torch.stack([trainer.callback_metrics[n].double().cpu() for n in names])


@pytest.mark.ddp
def test_two_process_ddp_training_with_certification_callback(tmp_path):
    pl.seed_everything(0)
    model = InterpretationRegularizedClassifier(
        SmallCNN(input_size=8), saliency_weight=20.0,
        interpretation_attack=TopKSaliencyAttack(eps=0.8, steps=2, restarts=1, search_steps=4),
        optimizer=partial(torch.optim.Adam, lr=2e-3))
    cert = SaliencyCertification(radii=(0.05, 0.1), num_samples=4, n_samples=64, sigma=0.15, log_images=False)
    trainer = ddp_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                          callbacks=[cert, MetricSync(tmp_path / "metric.pt"),
                                     RankGather(tmp_path / "params.pt"),
                                     RankGather(tmp_path / "cert.pt", fn=_certified)])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32, seed=1))
    params = torch.load(tmp_path / "params.pt", weights_only=True)
    assert params.shape[0] == 2 and torch.equal(params[0], params[1])
    certs = torch.load(tmp_path / "cert.pt", weights_only=True)
    assert torch.equal(certs[0], certs[1]) and (certs >= 0).all() and (certs <= 1).all()
    assert certs[0, 0] >= certs[0, 1]  # certified overlap shrinks with the radius
    value, ref = torch.load(tmp_path / "metric.pt", weights_only=True)
    assert value.item() == pytest.approx(ref.item(), abs=1e-6)
