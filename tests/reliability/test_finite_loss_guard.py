"""FiniteLossGuard: a NaN/inf loss stops training before it reaches the weights, naming module and step."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_robust.callbacks import FiniteLossGuard, NonFiniteLossError
from lightning_robust.models import Classifier
from lightning_robust.nets import MLP


def _loader(n: int = 64, poison_batch: int | None = None, value: float = float("nan")) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    if poison_batch is not None:
        x[poison_batch * 8] = value  # one poisoned sample in that batch of 8
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    kw.setdefault("max_epochs", 1)
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_classifier_stops_at_the_bad_step_with_weights_untouched(tmp_path, value):
    torch.manual_seed(0)
    model = Classifier(MLP(16, 3, hidden=(8,)), optimizer=partial(torch.optim.SGD, lr=0.1))
    snapshots: list[torch.Tensor] = []

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots.append(torch.cat([p.detach().flatten().clone() for p in pl_module.parameters()]))

    with pytest.raises(NonFiniteLossError, match=r"Classifier at global step 3 \(epoch 0") as info:
        _trainer(tmp_path, callbacks=[FiniteLossGuard(), Snap()]).fit(model, _loader(poison_batch=3, value=value))
    assert "loss" in str(info.value)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    # The bad batch (index 3) never updated the weights: they equal those at its start, and are finite.
    assert torch.isfinite(after).all()
    assert torch.equal(after, snapshots[3])


def test_no_false_alarm_and_unguarded_run_trains_on_garbage(tmp_path):
    torch.manual_seed(0)
    clean = Classifier(MLP(16, 3, hidden=(8,)), optimizer=partial(torch.optim.SGD, lr=0.1))
    _trainer(tmp_path, callbacks=[FiniteLossGuard(check_gradients=True)]).fit(clean, _loader())
    assert all(torch.isfinite(p).all() for p in clean.parameters())
    # Without the guard the same poisoned batch silently turns every weight into NaN: what the guard prevents.
    unguarded = Classifier(MLP(16, 3, hidden=(8,)), optimizer=partial(torch.optim.SGD, lr=0.1))
    _trainer(tmp_path).fit(unguarded, _loader(poison_batch=2))
    assert all(torch.isnan(p).all() for p in unguarded.parameters())


class _ManualModule(pl.LightningModule):
    """Manual optimization (as the GANs use) with a loss that turns infinite at a given step."""

    def __init__(self, bad_step: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.lin = nn.Linear(2, 1)
        self.bad_step = bad_step

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.lin(batch[0]).pow(2).mean()
        if batch_idx == self.bad_step:
            loss = loss * float("inf")
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train/g_loss", loss.detach())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_manual_optimization_is_guarded_before_backward(tmp_path):
    model = _ManualModule(bad_step=2)
    data = DataLoader(TensorDataset(torch.randn(40, 2)), batch_size=4)
    with pytest.raises(NonFiniteLossError, match=r"_ManualModule at global step 2"):
        _trainer(tmp_path, callbacks=[FiniteLossGuard()]).fit(model, data)
    assert torch.isfinite(model.lin.weight).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="every_n_steps"):
        FiniteLossGuard(every_n_steps=0)
    with pytest.raises(ValueError, match="metric_substring"):
        FiniteLossGuard(metric_substring=3)  # type: ignore[arg-type]


class _NaNValidation(Classifier):
    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(float("nan")))


def test_a_non_finite_validation_loss_does_not_stop_training(tmp_path):
    torch.manual_seed(0)
    model = _NaNValidation(MLP(16, 3, hidden=(8,)), optimizer=partial(torch.optim.SGD, lr=0.1))
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[FiniteLossGuard()])
    trainer.fit(model, _loader(), _loader(16))
    assert trainer.current_epoch == 2 and torch.isnan(trainer.callback_metrics["val/loss"])
