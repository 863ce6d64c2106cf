"""RobustnessEvaluation: numbers, DDP agreement with one process, dishonest-evaluation warnings."""

import copy

import pytest
import pytorch_lightning as pl
import torch

from lightning_robust.attacks import FGSM, PGD, Attack, ThreatModel
from lightning_robust.callbacks import RobustnessEvaluation
from lightning_robust.datamodules import DigitsDataModule
from tests.helpers.ddp import ddp_trainer, single_trainer


class LogitsModule(pl.LightningModule):
    """The least a module must offer the callback: a forward that returns logits (not a Classifier)."""

    def __init__(self, net: torch.nn.Module, scale: float = 1.0) -> None:
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        return self.net(x) * self.scale

    def training_step(self, batch, batch_idx):
        x, y = batch[:2]
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class CountingPGD(PGD):
    """PGD that counts the batches it attacks."""

    calls = 0

    def perturb(self, model, x, y, generator):
        CountingPGD.calls += 1
        return super().perturb(model, x, y, generator)


class OutOfBudget(Attack):
    """A broken attack: adds 0.5 everywhere, far outside its 0.1 budget."""

    def __init__(self) -> None:
        super().__init__(ThreatModel("linf", 0.1))

    def perturb(self, model, x, y, generator):
        return (x + 0.5).clamp(0, 1)


def _attacks():
    return {"pgd": PGD(eps=0.1, alpha=0.025, steps=5, random_start=False), "fgsm": FGSM(eps=0.1)}


@pytest.mark.ddp
def test_ddp_logs_the_same_numbers_as_one_process(tmp_path, trained_digits_cnn):
    dm = DigitsDataModule(batch_size=32, seed=0)  # 144 validation digits: 72 per rank, no padding
    dm.setup()
    assert len(dm.val_dataset) % 2 == 0
    single_cb = RobustnessEvaluation(_attacks(), num_samples=144)
    single = single_trainer(tmp_path / "one", callbacks=[single_cb]).validate(
        LogitsModule(copy.deepcopy(trained_digits_cnn)), datamodule=dm, verbose=False)[0]
    ddp_cb = RobustnessEvaluation(_attacks(), num_samples=144)
    ddp = ddp_trainer(tmp_path / "two", callbacks=[ddp_cb]).validate(
        LogitsModule(copy.deepcopy(trained_digits_cnn)), datamodule=dm, verbose=False)[0]
    keys = {"robust/clean_acc", "robust/pgd_acc", "robust/fgsm_acc", "robust/zero_grad_fraction",
            "robust/pgd_violations", "robust/fgsm_violations"}
    assert keys <= set(single) and keys <= set(ddp)
    for k in keys:
        assert ddp[k] == pytest.approx(single[k], abs=1e-9), k
    assert single["robust/clean_acc"] > single["robust/fgsm_acc"] >= single["robust/pgd_acc"]
    assert single["robust/pgd_violations"] == 0 and single["robust/zero_grad_fraction"] < 0.1


def test_numbers_match_a_direct_computation_and_state_round_trips(tmp_path, trained_digits_cnn):
    dm = DigitsDataModule(batch_size=32, seed=0)
    dm.setup()
    cb = RobustnessEvaluation({"pgd": PGD(eps=0.1, alpha=0.025, steps=5, random_start=False)}, num_samples=64)
    module = LogitsModule(copy.deepcopy(trained_digits_cnn))
    out = single_trainer(tmp_path, callbacks=[cb]).validate(module, datamodule=dm, verbose=False)[0]
    x, y = next(iter(torch.utils.data.DataLoader(dm.val_dataset, batch_size=64)))
    net = trained_digits_cnn
    x_adv = PGD(eps=0.1, alpha=0.025, steps=5, random_start=False)(net, x, y)
    assert out["robust/clean_acc"] == pytest.approx((net(x).argmax(1) == y).float().mean().item())
    assert out["robust/pgd_acc"] == pytest.approx((net(x_adv).argmax(1) == y).float().mean().item())
    fresh = RobustnessEvaluation({"pgd": PGD()})
    fresh.load_state_dict(cb.state_dict())
    assert fresh.results == cb.results and fresh.results["pgd_acc"] == pytest.approx(out["robust/pgd_acc"])


def test_every_n_epochs_and_max_batches_in_fit(tmp_path, trained_digits_cnn):
    CountingPGD.calls = 0
    cb = RobustnessEvaluation({"pgd": CountingPGD(eps=0.1, steps=2)}, every_n_epochs=2, num_samples=64,
                              batch_size=32)
    trainer = single_trainer(tmp_path, max_epochs=3, limit_train_batches=1, callbacks=[cb])
    trainer.fit(LogitsModule(copy.deepcopy(trained_digits_cnn)), datamodule=DigitsDataModule(batch_size=32))
    assert CountingPGD.calls == 2  # epoch index 1 only (sanity check skipped), two chunks of 32
    assert "robust/pgd_acc" in trainer.callback_metrics


def test_warns_on_signs_of_a_dishonest_evaluation(tmp_path, trained_digits_cnn):
    dm = DigitsDataModule(batch_size=64, seed=0)
    # "Helping" attack: targeted PGD towards the true label makes the model more accurate than clean.
    helping = PGD(eps=0.2, alpha=0.05, steps=5, targeted=True, random_start=False)
    cb = RobustnessEvaluation({"helping": helping, "broken": OutOfBudget()}, num_samples=128)
    with pytest.warns(UserWarning, match="RobustnessEvaluation") as record:
        single_trainer(tmp_path, callbacks=[cb]).validate(LogitsModule(copy.deepcopy(trained_digits_cnn)),
                                                          datamodule=dm, verbose=False)
    text = " ".join(str(w.message) for w in record)
    assert "'helping'" in text and "above clean accuracy" in text
    assert "'broken' lie outside its budget" in text and cb.results["broken_violations"] == 128
    # Logits scaled by 1e4 saturate the softmax: the loss gradient vanishes (gradient masking).
    masked = RobustnessEvaluation({"pgd": PGD(eps=0.1, steps=2)}, num_samples=64)
    with pytest.warns(UserWarning, match="all-zero loss gradient"):
        single_trainer(tmp_path, callbacks=[masked]).validate(
            LogitsModule(copy.deepcopy(trained_digits_cnn), scale=1e4), datamodule=dm, verbose=False)
    assert masked.results["zero_grad_fraction"] > 0.5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(attacks={}), ValueError, "attacks must be a non-empty mapping"),
        (dict(attacks={"pgd": "PGD"}), TypeError, r"attacks\['pgd'\] must be an Attack or a callable"),
        (dict(attacks=[PGD()]), TypeError, "attacks must be a mapping"),
        (dict(attacks={"pgd": PGD()}, every_n_epochs=-1), ValueError, "every_n_epochs must be >= 0"),
        (dict(attacks={"pgd": PGD()}, every_n_epochs=1.5), TypeError, "every_n_epochs must be an int"),
        (dict(attacks={"pgd": PGD()}, num_samples=0), ValueError, "num_samples must be a positive integer"),
        (dict(attacks={"pgd": PGD()}, zero_grad_tolerance=2.0), ValueError,
         r"zero_grad_tolerance must lie in \[0, 1\]"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        RobustnessEvaluation(**kwargs)
