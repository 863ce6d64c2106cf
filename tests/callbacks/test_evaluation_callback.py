"""The shared contract of the evaluation callbacks: schedule, test/validate results, one subset, fail fast,
monitorable metrics, deprecated names."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_robust.attacks import PGD
from lightning_robust.callbacks import (
    CertificationCallback,
    EvaluationCallback,
    GANEvaluation,
    LikelihoodHistogram,
    RobustnessEvaluation,
    SaliencyCertification,
    SampleGrid,
)
from lightning_robust.certify import NotPiecewiseLinearError
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.models import Classifier
from lightning_robust.nets import MLP
from tests.helpers.ddp import single_trainer


def _classifier() -> Classifier:
    pl.seed_everything(0)
    return Classifier(MLP(64, 10, (32, 32)))


def _dm(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, eval_batch_size=32, seed=0, **kwargs)


def _pgd() -> PGD:
    return PGD(eps=0.1, alpha=0.025, steps=3, random_start=False)


def _all_callbacks(every_n_epochs: int, trained_digits_cnn: nn.Module) -> list[EvaluationCallback]:
    return [
        RobustnessEvaluation({"pgd": _pgd()}, every_n_epochs=every_n_epochs),
        CertificationCallback(every_n_epochs=every_n_epochs),
        SaliencyCertification(every_n_epochs=every_n_epochs),
        LikelihoodHistogram(every_n_epochs=every_n_epochs),
        SampleGrid(every_n_epochs=every_n_epochs),
        GANEvaluation(trained_digits_cnn, every_n_epochs=every_n_epochs),
    ]


def _state(epoch: int, fn: TrainerFn = TrainerFn.FITTING, sanity: bool = False) -> SimpleNamespace:
    return SimpleNamespace(current_epoch=epoch, sanity_checking=sanity, state=SimpleNamespace(fn=fn))


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_every_callback_has_one_meaning_of_every_n_epochs(n, trained_digits_cnn):
    """During fit: after epochs n-1, 2n-1, ... (0-based), never for n = 0 or in the sanity check; always in
    validate and test."""
    for cb in _all_callbacks(n, trained_digits_cnn):
        due = [e for e in range(9) if cb.is_due(_state(e))]
        assert due == ([] if n == 0 else [e for e in range(9) if (e + 1) % n == 0]), type(cb).__name__
        assert not cb.is_due(_state(n - 1 if n else 0, sanity=True))
        for fn in (TrainerFn.VALIDATING, TrainerFn.TESTING):
            assert cb.is_due(_state(5, fn)), (type(cb).__name__, fn)


def test_fit_schedule_counts_evaluations(tmp_path):
    calls: list[int] = []

    class Spy(RobustnessEvaluation):
        def evaluate(self, trainer, pl_module, data, stage):
            calls.append(trainer.current_epoch)

    trainer = single_trainer(tmp_path, max_epochs=5, limit_train_batches=1, limit_val_batches=1,
                             callbacks=[Spy({"pgd": _pgd()}, every_n_epochs=2)])
    trainer.fit(_classifier(), datamodule=_dm())
    assert calls == [1, 3]


@pytest.mark.slow
def test_test_and_validate_return_every_metric_and_share_one_subset(tmp_path):
    """trainer.test / trainer.validate return the callbacks' numbers; clean accuracy is one number."""
    dm = _dm()
    module = _classifier()
    single_trainer(tmp_path, max_epochs=2, limit_train_batches=10).fit(module, datamodule=dm)
    callbacks = [
        RobustnessEvaluation({"pgd": _pgd()}, num_samples=80),
        CertificationCallback("simplex", radii=(0.0, 0.1), num_samples=80, log_histogram=False),
        SaliencyCertification(radii=(0.1,), num_samples=4, n_samples=32, log_images=False),
    ]
    trainer = single_trainer(tmp_path, callbacks=callbacks)
    tested = trainer.test(module, datamodule=dm, verbose=False)[0]
    keys = {"robust/clean_acc", "robust/pgd_acc", "cert/simplex/acc@0", "cert/simplex/acc@0.1",
            "cert/simplex/mean_radius", "saliency/certified_topk@0.1"}
    assert keys <= set(tested)
    # One subset: the first 80 test inputs; clean accuracy computed by hand equals both callbacks' number.
    x, y = map(torch.cat, zip(*[(b[0], b[1]) for b in dm.test_dataloader()]))
    module.eval()
    with torch.no_grad():
        clean = float((module(x[:80]).argmax(1) == y[:80]).double().mean())
    assert tested["robust/clean_acc"] == pytest.approx(clean, abs=1e-7)
    assert tested["cert/simplex/acc@0"] == pytest.approx(clean, abs=1e-7)
    robust = float((module(_pgd()(module, x[:80], y[:80])).argmax(1) == y[:80]).double().mean())
    assert tested["robust/pgd_acc"] == pytest.approx(robust, abs=1e-7)
    validated = single_trainer(tmp_path, callbacks=copy.deepcopy(callbacks)).validate(module, datamodule=dm,
                                                                                    verbose=False)[0]
    assert keys <= set(validated)
    xv, yv = map(torch.cat, zip(*[(b[0], b[1]) for b in dm.val_dataloader()]))
    with torch.no_grad():
        clean_val = float((module(xv[:80]).argmax(1) == yv[:80]).double().mean())
    assert validated["robust/clean_acc"] == pytest.approx(clean_val, abs=1e-7)


def test_metrics_are_monitorable_and_shown_in_the_progress_bar(tmp_path):
    """EarlyStopping on a callback's metric stops the run; prog_bar puts the numbers in the progress bar."""
    cb = RobustnessEvaluation({"pgd": PGD(eps=0.0, steps=1)}, num_samples=32, prog_bar=True)
    stop = EarlyStopping(monitor="robust/pgd_acc", mode="max", patience=0, min_delta=2.0)  # never "improves"
    trainer = single_trainer(tmp_path, max_epochs=6, limit_train_batches=1, limit_val_batches=1,
                             callbacks=[cb, stop])
    trainer.fit(_classifier(), datamodule=_dm())
    assert trainer.current_epoch == 2 and stop.stopped_epoch == 1  # epoch 0 sets the best, epoch 1 stops
    assert "robust/pgd_acc" in trainer.progress_bar_metrics


# ---- fail fast -----------------------------------------------------------------------------------------------
class _Normalised(DigitsDataModule):
    """Digits standardised outside the model (the mistake: attacks then clip to the wrong box)."""

    def val_dataloader(self):
        x, y = map(torch.cat, zip(*[(b[0], b[1]) for b in super().val_dataloader()]))
        return DataLoader(TensorDataset((x - 0.3) / 0.3, y), batch_size=32)


class _Softplus(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Softplus(), nn.Linear(16, 10))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("make", "module", "error", "match"),
    [
        (lambda: CertificationCallback(net="backbone"), _classifier, ValueError, r"net='backbone' is not a submodule"),
        (lambda: SaliencyCertification(net="backbone"), _classifier, ValueError, r"net='backbone' is not a submodule"),
        (lambda: RobustnessEvaluation({"pgd": _pgd()}, net="net.99"), _classifier, ValueError, r"net='net\.99'"),
        (lambda: CertificationCallback(), _Softplus, NotPiecewiseLinearError, "Softplus"),
        (lambda: LikelihoodHistogram(method="score"), _classifier, ValueError, "method='score' is not a method"),
        (lambda: SampleGrid(), _classifier, TypeError, r"neither `sample\("),
    ],
)
def test_misconfiguration_fails_before_the_first_step(tmp_path, make, module, error, match):
    trainer = single_trainer(tmp_path, max_epochs=1, limit_train_batches=2, callbacks=[make()])
    with pytest.raises(error, match=match):
        trainer.fit(module(), datamodule=_dm())
    assert trainer.global_step == 0


def test_data_outside_the_attack_bounds_fails_before_the_first_step(tmp_path):
    trainer = single_trainer(tmp_path, max_epochs=1, limit_train_batches=2,
                             callbacks=[RobustnessEvaluation({"pgd": _pgd()})])
    with pytest.raises(ValueError, match=r"put the normalisation inside the model .* or set low/high"):
        trainer.fit(_classifier(), datamodule=_Normalised(batch_size=32, seed=0))
    assert trainer.global_step == 0
    # The way out that the message names: the attack's box set to the data's range.
    wide = PGD(eps=0.1, steps=1, low=-1.5, high=2.5)
    ok = single_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                        callbacks=[RobustnessEvaluation({"pgd": wide}, num_samples=32)])
    ok.fit(_classifier(), datamodule=_Normalised(batch_size=32, seed=0))
    assert "robust/pgd_acc" in ok.callback_metrics


def test_gan_evaluation_without_the_real_split_fails_before_the_first_step(tmp_path, trained_digits_cnn):
    class Gen(pl.LightningModule):
        latent_dim = 4

        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Linear(4, 64)

        def forward(self, z):
            return torch.sigmoid(self.g(z)).view(-1, 1, 8, 8)

        def training_step(self, batch, batch_idx):
            return self(torch.randn(2, 4)).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=4)
    trainer = single_trainer(tmp_path, max_epochs=1, callbacks=[GANEvaluation(trained_digits_cnn)])
    with pytest.raises(ValueError, match=r"real_split='val'"):
        trainer.fit(Gen(), train_dataloaders=loader)
    assert trainer.global_step == 0


# ---- deprecated names --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "attr", "value"),
    [
        (lambda: RobustnessEvaluation({"pgd": _pgd()}, log_prefix="adv"), "prefix", "adv"),
        (lambda: CertificationCallback(max_samples=12), "num_samples", 12),
        (lambda: SaliencyCertification(model_attr="net"), "net", "net"),
        (lambda: LikelihoodHistogram(tag="ll"), "prefix", "ll"),
        (lambda: LikelihoodHistogram(max_samples=7), "num_samples", 7),
        (lambda: SampleGrid(n=9), "num_samples", 9),
        (lambda: SampleGrid(tag="grid"), "prefix", "grid"),
    ],
)
def test_old_names_still_work_with_a_deprecation_warning(make, attr, value):
    with pytest.warns(DeprecationWarning, match="deprecated"):
        cb = make()
    assert getattr(cb, attr) == value


def test_old_max_batches_becomes_a_sample_count_and_both_names_at_once_is_an_error(tmp_path):
    with pytest.warns(DeprecationWarning, match="max_batches"):
        cb = RobustnessEvaluation({"pgd": _pgd()}, max_batches=2)
    single_trainer(tmp_path, callbacks=[cb]).validate(_classifier(), datamodule=_dm(), verbose=False)
    assert cb.num_samples == 64  # two batches of 32
    with pytest.raises(ValueError, match="give prefix= only"):
        RobustnessEvaluation({"pgd": _pgd()}, prefix="a", log_prefix="b")


def test_a_foreign_callable_attack_is_accepted_and_checked(tmp_path):
    """Any ``attack(model, x, y) -> x_adv`` works; only the [0, 1] box can be checked for it."""
    identity = RobustnessEvaluation({"same": lambda model, x, y: x.clone()}, num_samples=32)
    out = single_trainer(tmp_path, callbacks=[identity]).validate(_classifier(), datamodule=_dm(), verbose=False)[0]
    assert out["robust/same_acc"] == out["robust/clean_acc"] and out["robust/same_violations"] == 0
    outside = RobustnessEvaluation({"bright": lambda model, x, y: x + 2.0}, num_samples=32)
    with pytest.warns(UserWarning, match="'bright' lie outside its budget or the value bounds"):
        single_trainer(tmp_path, callbacks=[outside]).validate(_classifier(), datamodule=_dm(), verbose=False)
    assert outside.results["bright_violations"] == 32
