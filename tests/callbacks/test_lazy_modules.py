"""Our callbacks on a user's module that builds its network lazily (in ``setup`` or ``configure_model``).

Lightning calls the callbacks' ``setup`` before the module's own ``setup`` / ``configure_model`` and before the
strategy moves the module to its device, so checks that read the module run when the stage starts. Reference:
the same callbacks on an eagerly built twin with identical weights must log identical numbers.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.attacks import PGD
from lightning_robust.callbacks import (
    CertificationCallback,
    DeepKNNPoisonFilter,
    GANEvaluation,
    RobustnessEvaluation,
    TripWire,
)
from lightning_robust.datamodules import DigitsDataModule
from tests.helpers.ddp import single_trainer


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class Foreign(pl.LightningModule):
    """A user's classifier; ``build_in`` says where its ``net`` is created ("init", "setup", "configure_model")."""

    def __init__(self, build_in: str = "init") -> None:
        super().__init__()
        self.build_in = build_in
        if build_in == "init":
            self.net = _net()

    def setup(self, stage: str) -> None:
        if self.build_in == "setup" and not hasattr(self, "net"):
            self.net = _net()

    def configure_model(self) -> None:
        if self.build_in == "configure_model" and not hasattr(self, "net"):
            self.net = _net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _callbacks() -> list[pl.Callback]:
    pgd = PGD(eps=0.1, alpha=0.05, steps=3, random_start=False)  # deterministic: the twins must agree exactly
    return [RobustnessEvaluation({"pgd": pgd}, net="net", num_samples=64),
            CertificationCallback(net="net", num_samples=32),
            TripWire(batches=2, attack=pgd, net="net"),
            DeepKNNPoisonFilter(layer="net.2", k=10, filter_epoch=0)]


def _fit(tmp_path, build_in: str) -> dict[str, float]:
    dm = DigitsDataModule(batch_size=64, val_fraction=0.1, seed=0, with_index=True)
    trainer = single_trainer(tmp_path / build_in, max_epochs=2, limit_train_batches=4, callbacks=_callbacks())
    trainer.fit(Foreign(build_in), datamodule=dm)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.parametrize("build_in", ["setup", "configure_model"])
def test_callbacks_on_a_lazily_built_net_log_what_they_log_on_an_eager_twin(tmp_path, build_in):
    eager = _fit(tmp_path, "init")
    lazy = _fit(tmp_path, build_in)
    for key in ("robust/pgd_acc", "robust/clean_acc", "cert/simplex/mean_radius", "train/tripwire_acc",
                "poison_filter/num_removed"):
        assert any(k == key for k in eager), f"{key} not logged: {sorted(eager)}"
    assert lazy == eager


def test_a_wrong_net_on_a_lazy_module_still_fails_before_the_first_step(tmp_path):
    trainer = single_trainer(tmp_path, max_epochs=1, limit_train_batches=2,
                             callbacks=[RobustnessEvaluation({"pgd": PGD(eps=0.1, steps=1)}, net="nett")])
    with pytest.raises(ValueError, match=r"net='nett' is not a submodule of Foreign \(its submodules: \['net'\]\)"):
        trainer.fit(Foreign("configure_model"), datamodule=DigitsDataModule(batch_size=64, val_fraction=0.1))
    assert trainer.global_step == 0


def test_gan_evaluation_builds_after_the_module_is_on_its_device(tmp_path, trained_digits_cnn, monkeypatch):
    # On a GPU run the strategy's setup moves the module to the GPU after the callbacks' `setup`: a metric built
    # in `setup` would have stayed on the CPU. The first build must follow the move.
    from tests.callbacks.test_gan_callbacks import tiny_gan

    events: list[str] = []
    build = GANEvaluation._build

    def recording_build(self, device):
        events.append("build")
        build(self, device)

    monkeypatch.setattr(GANEvaluation, "_build", recording_build)
    ev = GANEvaluation(trained_digits_cnn, num_fake=32, kid=False, is_splits=2)
    trainer = single_trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[ev])
    strategy_setup = trainer.strategy.setup

    def recording_setup(t):
        events.append("strategy.setup")
        strategy_setup(t)

    monkeypatch.setattr(trainer.strategy, "setup", recording_setup)
    trainer.fit(tiny_gan(), datamodule=DigitsDataModule(image_size=8, batch_size=64, val_fraction=0.1, seed=0))
    assert "build" in events and events.index("strategy.setup") < events.index("build")


def test_gan_evaluation_follows_the_module_to_another_device(trained_digits_cnn):
    # A fit on one device and a test on another (the "meta" device stands in for a GPU here): the feature nets
    # and the metrics, with their accumulated real statistics, all move.
    ev = GANEvaluation(trained_digits_cnn, kid=True, kid_subset_size=8, is_splits=1)
    ev._build(torch.device("cpu"))
    assert ev.fid is not None and ev.kid is not None and ev.inception is not None and ev.logits is not None
    ev._build(torch.device("meta"))
    tensors = [*ev.features.parameters(), *ev.logits.parameters(), *ev.fid.metric_state.values(),
               *ev.kid.metric_state.values(), *ev.inception.metric_state.values()]
    flat = [t for v in tensors for t in (v if isinstance(v, list) else [v]) if torch.is_tensor(t)]
    assert flat and all(t.device.type == "meta" for t in flat)
