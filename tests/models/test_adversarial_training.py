"""Adversarial training in Classifier: Madry PGD, fast (FGSM + random start), free (replays), trip-wire."""

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_robust.attacks import FGSM, PGD, Attack, ReColorAdv
from lightning_robust.attacks.adversarial_training import free_delta_update, tripwire_tripped
from lightning_robust.datamodules import DigitsDataModule, load_digits_tensors
from lightning_robust.models import Classifier
from lightning_robust.nets import SmallCNN
from lightning_robust.utils import safe_load
from tests.helpers.ddp import flat_params


def _trainer(tmp_path, **kw):
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, deterministic=True, **kw)


def _pgd_accuracy(net, x, y, eps=0.1):
    x_adv = PGD(eps=eps, alpha=eps / 4, steps=10, random_start=False)(net, x, y)
    with torch.no_grad():
        return (net(x_adv).argmax(1) == y).float().mean().item(), (net(x).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_pgd_training_raises_pgd_accuracy_over_standard_training(tmp_path):
    dm = DigitsDataModule(batch_size=64, val_fraction=0.0, seed=0)
    dm.setup()
    x_test, y_test = next(iter(DataLoader(dm.test_dataset, batch_size=1000)))
    results = {}
    for name, attack in (("standard", None), ("pgd", PGD(eps=0.1, alpha=0.04, steps=4))):
        pl.seed_everything(0)
        model = Classifier(SmallCNN(input_size=8), optimizer=partial(torch.optim.Adam, lr=2e-3), attack=attack)
        _trainer(tmp_path, max_epochs=5, limit_val_batches=0).fit(model, datamodule=dm)
        results[name] = _pgd_accuracy(model.net.eval(), x_test, y_test)
    (std_robust, std_clean), (at_robust, at_clean) = results["standard"], results["pgd"]
    # Madry et al.: training on PGD examples buys robustness to PGD, at little clean cost at this scale.
    assert at_robust > std_robust + 0.2, results
    assert at_clean > 0.8 and std_clean > 0.8, results


def test_fast_mode_is_fgsm_with_random_start_and_trains(tmp_path):
    model = Classifier(SmallCNN(input_size=8), attack=PGD(eps=0.1, steps=7), adversarial_mode="fast")
    fast = model.train_attack
    assert isinstance(fast, FGSM) and fast.random_start and fast.alpha == pytest.approx(0.125)
    assert fast.eps == pytest.approx(0.1) and fast.norm == "linf"
    before = flat_params(model)
    _trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert not torch.equal(before, flat_params(model))


def _fgsm_rs_by_hand(net, x, y, eps, alpha):
    """Wong, Rice & Kolter (2020), Alg. 3, written out: δ ~ U[-ε, ε]^d, one signed step of size α on the
    cross-entropy, projection onto the ε-cube and the pixel box. Draws from the global RNG, like the module."""
    x0 = (x + (2 * torch.rand(x.shape, dtype=x.dtype) - 1) * eps).clamp(0, 1)
    x0.requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x0), y, reduction="sum"), x0)
    step = x0.detach() + alpha * grad.sign()
    return torch.minimum(torch.maximum(step, (x - eps).clamp(0, 1)), (x + eps).clamp(0, 1))


def test_fast_training_loss_is_cross_entropy_on_fgsm_random_start_examples(digits_tensors):
    # training_loss == CE(net(FGSM-rs(x)), y), with the same random start (the same global RNG state).
    x, y = digits_tensors[0][:24].double(), digits_tensors[1][:24]
    torch.manual_seed(0)
    model = Classifier(SmallCNN(input_size=8), attack=PGD(eps=0.1, steps=7), adversarial_mode="fast").double()
    net = model.net
    torch.manual_seed(11)
    loss, logits, _ = model.training_loss(x, y)
    torch.manual_seed(11)
    x_adv = _fgsm_rs_by_hand(net, x, y, eps=0.1, alpha=0.125)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-12 and (x_adv - x).abs().max() > 0.09
    expected = torch.nn.functional.cross_entropy(net(x_adv), y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    torch.testing.assert_close(logits, net(x_adv))
    # Sensitive to the adversarial examples (untrained net: small but far above the 1e-10 tolerance): the
    # clean loss and the loss without the random start differ.
    assert abs(loss.item() - torch.nn.functional.cross_entropy(net(x), y).item()) > 1e-5
    torch.manual_seed(11)
    no_start = FGSM(eps=0.1, alpha=0.125)(net, x, y)
    assert abs(loss.item() - torch.nn.functional.cross_entropy(net(no_start), y).item()) > 1e-5


def _free_model():
    pl.seed_everything(0)
    return Classifier(SmallCNN(input_size=8), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
                      attack=PGD(eps=0.1), adversarial_mode="free", free_replays=3)


def _ordered_loader():
    x, y = load_digits_tensors(8, 1)
    return DataLoader(TensorDataset(x[:200], y[:200]), batch_size=48, shuffle=False)  # 5 batches, last of 8


def test_free_training_replays_and_resumes_identically(tmp_path):
    model = _free_model()
    trainer = _trainer(tmp_path / "a", max_epochs=2)
    trainer.fit(model, train_dataloaders=_ordered_loader())
    assert trainer.global_step == 2 * 5 * 3  # one optimizer step per replay
    delta = model._free_delta
    assert delta is not None and delta.abs().max() <= 0.1 + 1e-6 and delta.abs().max() > 0.05

    half = _free_model()
    ckpt_trainer = _trainer(tmp_path / "b", max_epochs=1, enable_checkpointing=True)
    ckpt_trainer.fit(half, train_dataloaders=_ordered_loader())
    ckpt = next((tmp_path / "b").rglob("*.ckpt"))
    saved = safe_load(ckpt)  # weights_only: the carried perturbation is a plain tensor
    assert saved["adversarial_training"]["free_delta"].shape == (1, 48, 1, 8, 8)
    resumed = _free_model()
    _trainer(tmp_path / "c", max_epochs=2).fit(resumed, train_dataloaders=_ordered_loader(), ckpt_path=str(ckpt))
    assert torch.equal(flat_params(resumed), flat_params(model))
    assert torch.equal(resumed._free_delta, delta)

    # Without the carried perturbation the resumed run would differ: the checkpoint state matters.
    saved["adversarial_training"].pop("free_delta")
    torch.save(saved, tmp_path / "no_delta.ckpt")
    amnesic = _free_model()
    _trainer(tmp_path / "d", max_epochs=2).fit(amnesic, train_dataloaders=_ordered_loader(),
                                              ckpt_path=str(tmp_path / "no_delta.ckpt"))
    assert not torch.equal(flat_params(amnesic), flat_params(model))


def test_free_delta_update_is_a_projected_sign_step():
    attack = PGD(eps=0.1)
    delta = torch.tensor([[0.05, -0.08, 0.0]])
    grad = torch.tensor([[1.0, -2.0, -0.5]])
    assert torch.allclose(free_delta_update(delta, grad, attack), torch.tensor([[0.1, -0.1, -0.1]]))
    l2 = free_delta_update(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), PGD(eps=0.5, norm="l2"))
    assert torch.allclose(l2, torch.tensor([[0.3, 0.4]]))


class GrowingNoise(Attack):
    """Test attack: uniform noise whose size grows with every call (accuracy under it must fall)."""

    def __init__(self) -> None:
        from lightning_robust.attacks import ThreatModel

        super().__init__(ThreatModel("linf", 1.0))
        self.calls = 0

    def perturb(self, model, x, y, generator):
        self.calls += 1
        scale = min(1.0, 0.2 * (self.calls - 1))
        return (x + scale * (2 * torch.rand(x.shape, generator=generator) - 1)).clamp(0, 1)


def test_tripwire_logs_and_stops_on_a_collapse(tmp_path):
    pl.seed_everything(0)
    model = Classifier(SmallCNN(input_size=8), optimizer=partial(torch.optim.Adam, lr=2e-3),
                       tripwire_batches=2, tripwire_attack=GrowingNoise(), tripwire_max_drop=0.15)
    trainer = _trainer(tmp_path, max_epochs=10, limit_val_batches=0)
    with pytest.warns(UserWarning, match="trip-wire: accuracy under GrowingNoise fell"):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    history = model.tripwire_history
    assert 2 <= len(history) < 10 and trainer.current_epoch < 10
    assert history[-1] < max(history[:-1]) - 0.15
    assert trainer.callback_metrics["train/tripwire_acc"].item() == pytest.approx(history[-1])
    assert tripwire_tripped([0.5, 0.6, 0.4], 0.15) and not tripwire_tripped([0.5, 0.6, 0.5], 0.15)
    assert not tripwire_tripped([0.9, 0.0], None)


def test_default_tripwire_is_pgd10_on_the_training_threat_and_hparams_stay_primitive(tmp_path):
    model = Classifier(SmallCNN(input_size=8), attack=FGSM(eps=0.1, random_start=True), tripwire_batches=1)
    assert isinstance(model.tripwire_attack, PGD) and model.tripwire_attack.steps == 10
    assert model.tripwire_attack.eps == pytest.approx(0.1) and model.tripwire_attack.alpha == pytest.approx(0.025)
    assert "attack" not in model.hparams and model.hparams["adversarial_mode"] == "pgd"


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(attack=PGD(), adversarial_mode="trades"), ValueError, "adversarial_mode must be one of"),
        (dict(attack=PGD(), adversarial_mode="free", free_replays=0), ValueError, "free_replays must be a positive"),
        (dict(attack=ReColorAdv(), adversarial_mode="free"), ValueError, "needs an L-inf or L2 attack"),
        (dict(attack=ReColorAdv(), adversarial_mode="fast"), ValueError, "needs an L-inf or L2 attack"),
        (dict(tripwire_batches=2), ValueError, "tripwire_attack must be given"),
        (dict(tripwire_batches=-1), ValueError, "tripwire_batches must be an integer >= 0"),
        (dict(attack="pgd"), TypeError, "attack must be an Attack"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Classifier(SmallCNN(input_size=8), **kwargs)


@pytest.mark.ddp
def test_free_training_with_tripwire_in_ddp_keeps_ranks_identical(tmp_path):
    from tests.helpers.ddp import RankGather, ddp_trainer

    model = Classifier(SmallCNN(input_size=8), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
                       attack=PGD(eps=0.1), adversarial_mode="free", free_replays=2, tripwire_batches=1)
    trainer = ddp_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                          enable_checkpointing=True, callbacks=[RankGather(tmp_path / "params.pt")])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    gathered = torch.load(tmp_path / "params.pt", weights_only=True)
    assert torch.equal(gathered[0], gathered[1])  # RankGather also asserts it on every rank
    ckpt = safe_load(next(tmp_path.rglob("*.ckpt")))
    state = ckpt["adversarial_training"]
    # Each rank's own carried perturbation is kept; the trip-wire history is the same on both ranks.
    assert state["free_delta"].shape == (2, 32, 1, 8, 8) and not torch.equal(*state["free_delta"])
    assert len(state["tripwire_history"]) == 2
    assert ckpt["global_step"] == 2 * 3 * 2
