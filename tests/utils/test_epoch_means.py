"""EpochMeans logs what per-step ``self.log(..., on_step=False, on_epoch=True)`` calls would have logged."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_robust.utils import EpochMeans


class _Logger(pl.LightningModule):
    """Logs per step: ``a`` (a tensor), ``b`` (a Python float, every other step only), through Lightning's own
    per-step epoch aggregation (``accumulate=False``) or through :class:`EpochMeans`."""

    def __init__(self, accumulate: bool) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self.accumulate = accumulate
        self.epoch_means = EpochMeans()

    def training_step(self, batch, batch_idx):
        (x,) = batch
        n = x.shape[0]
        values = {"a": (x.sum(1) * self.w).mean().detach()}
        if batch_idx % 2 == 0:
            values["b"] = float(batch_idx) + 0.25
        if self.accumulate:
            self.epoch_means.add(values, n)
        else:
            for k, v in values.items():
                self.log(f"train/{k}", v, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        return (self.w * x).sum()

    def on_train_epoch_end(self) -> None:
        if self.accumulate:
            self.epoch_means.log(self, prefix="train/")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _epoch_metrics(accumulate: bool, tmp_path) -> dict[str, float]:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(23, 3))  # batches of 5, 5, 5, 5, 3: the last one is smaller
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", devices=1)
    trainer.fit(_Logger(accumulate), DataLoader(data, batch_size=5))
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_epoch_means_match_lightnings_per_step_epoch_aggregation(tmp_path):
    reference = _epoch_metrics(False, tmp_path)
    ours = _epoch_metrics(True, tmp_path)
    assert set(ours) == set(reference) == {"train/a", "train/b"}
    for key, value in reference.items():
        assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_weighted_mean_closed_form_and_reset():
    m = EpochMeans()
    m.add({"a": torch.tensor(1.0), "b": 2.0}, 4)
    m.add({"a": torch.tensor(3.0)}, 2)
    means = m.means()
    assert float(means["a"]) == pytest.approx((4 * 1.0 + 2 * 3.0) / 6)
    assert means["b"] == pytest.approx(2.0)
    m.reset()
    assert m.means() == {}
