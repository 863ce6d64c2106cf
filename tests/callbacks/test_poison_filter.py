"""DeepKNNPoisonFilter on a foreign LightningModule: planted mislabelled points, one exclusion path, resume, errors."""

import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_robust.callbacks import DeepKNNPoisonFilter
from lightning_robust.datamodules import DatasetDataModule, DigitsDataModule, load_digits_tensors
from lightning_robust.defenses import deep_knn_filter
from tests.helpers.ddp import single_trainer

# Training positions whose labels are shifted by one: planted mislabelled points.
FLIPPED = list(range(3, 1400, 70))


class ForeignClassifier(pl.LightningModule):
    """A LightningModule that knows nothing of lightning_robust: its own layer names, plain batches."""

    def __init__(self, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU())
        self.head = nn.Linear(48, 10)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class NoisyDigits(DigitsDataModule):
    """The bundled digits with the labels of FLIPPED training positions shifted by one."""

    def build_datasets(self):
        train, test = super().build_datasets()
        x, y = train.tensors
        y = y.clone()
        y[FLIPPED] = (y[FLIPPED] + 1) % 10
        return TensorDataset(x, y), test


class IndexRecorder(pl.Callback):
    """Dataset indices of the batches of each epoch."""

    def __init__(self) -> None:
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())


def _noisy_dm() -> NoisyDigits:
    return NoisyDigits(batch_size=64, val_fraction=0.0, with_index=True)


class CountingSetup(NoisyDigits):
    """Counts ``setup`` calls: only the Trainer may call it."""

    setups = 0

    def setup(self, stage=None):
        type(self).setups += 1
        super().setup(stage)


def test_foreign_module_removes_planted_mislabelled_points(tmp_path):
    dm = CountingSetup(batch_size=64, val_fraction=0.0, with_index=True)
    model, rec = ForeignClassifier(), IndexRecorder()
    filt = DeepKNNPoisonFilter(layer="backbone.2", filter_epoch=3, output_file=str(tmp_path / "removed.json"))
    trainer = single_trainer(tmp_path, max_epochs=4, callbacks=[filt, rec], limit_val_batches=0,
                             reload_dataloaders_every_n_epochs=1)
    trainer.fit(model, datamodule=dm)
    assert CountingSetup.setups == 1  # the Trainer's own setup("fit"); the callback never calls it
    removed = set(filt.removed_indices)
    # logged through the LightningModule: monitorable like any metric
    assert trainer.callback_metrics["poison_filter/num_removed"].item() == len(removed)
    assert trainer.callback_metrics["poison_filter/num_examples"].item() == len(dm.train_dataset)
    assert set(FLIPPED) <= removed  # every planted mislabelled point is caught
    assert len(removed - set(FLIPPED)) < 0.05 * len(dm.train_dataset)  # few clean ones
    # Epochs before the filter saw everything; the next epoch's loader no longer yields removed points.
    assert sorted(rec.seen[2]) == list(range(len(dm.train_dataset)))
    assert removed.isdisjoint(rec.seen[3])
    assert len(rec.seen[3]) == len(dm.train_dataset) - len(removed)
    assert dm.excluded_train_indices == sorted(removed)
    report = json.loads((tmp_path / "removed.json").read_text())
    assert report["removed_indices"] == sorted(removed) and report["filtered_before_epoch"] == 3
    assert report["k"] == round(len(dm.train_dataset) / 10)  # the paper's guideline: examples per class
    assert filt.k_used == report["k"]


def test_plain_datasets_through_dataset_datamodule_and_separate_extractor(tmp_path):
    x, y = load_digits_tensors()
    x, y = x[:600], y[:600].clone()
    y[FLIPPED[:8]] = (y[FLIPPED[:8]] + 1) % 10
    dm = DatasetDataModule(TensorDataset(x, y), val_fraction=0.0, with_index=True, batch_size=100)
    extractor = nn.Sequential(nn.Flatten())  # raw pixels: the digits are well clustered already
    ref_keep = deep_knn_filter(x.flatten(1), y, 20)
    rec = IndexRecorder()
    filt = DeepKNNPoisonFilter(k=20, feature_extractor=extractor, filter_epoch=1)
    trainer = single_trainer(tmp_path, max_epochs=2, callbacks=[filt, rec], reload_dataloaders_every_n_epochs=1)
    trainer.fit(ForeignClassifier(), datamodule=dm)
    assert filt.removed_indices == (~ref_keep).nonzero().flatten().tolist()
    assert set(FLIPPED[:8]) <= set(filt.removed_indices)
    assert dm.excluded_train_indices == filt.removed_indices
    assert set(filt.removed_indices).isdisjoint(rec.seen[1]) and len(rec.seen[0]) == 600
    assert (tmp_path / "poison_filter.json").is_file()


def test_filter_after_epoch_0_asks_for_reloaded_loaders_and_leaves_the_trainer_alone(tmp_path):
    trainer = single_trainer(tmp_path, max_epochs=2, limit_val_batches=0,
                             callbacks=[DeepKNNPoisonFilter(layer="backbone.2", filter_epoch=1)])
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        trainer.fit(ForeignClassifier(), datamodule=_noisy_dm())
    assert trainer.reload_dataloaders_every_n_epochs == 0  # not changed behind the user's back


def test_resume_keeps_the_same_kept_set(tmp_path):
    ckpts = tmp_path / "ckpt"
    filt = DeepKNNPoisonFilter(layer="backbone.2", filter_epoch=1)
    trainer = single_trainer(tmp_path, max_epochs=2, enable_checkpointing=True, limit_val_batches=0,
                             reload_dataloaders_every_n_epochs=1,
                             callbacks=[filt, ModelCheckpoint(dirpath=ckpts, save_top_k=-1, every_n_epochs=1)])
    trainer.fit(ForeignClassifier(), datamodule=_noisy_dm())
    first = filt.removed_indices
    assert first
    saved = sorted(ckpts.glob("epoch=*.ckpt"))
    assert [p.name[:7] for p in saved] == ["epoch=0", "epoch=1"]
    for path in saved:  # saved after the filter ran at the end of epoch 0, so both hold the decision
        state = torch.load(path, weights_only=True)
        # the removed positions are checkpointed once, in the DataModule's exclusion set; the callback's
        # state only records that it decided (before epoch 1)
        assert state["NoisyDigits"]["excluded_train_indices"] == first
        (filter_state,) = [v for v in state["callbacks"].values() if "filtered_before_epoch" in v]
        assert filter_state["filtered_before_epoch"] == 1 and "removed_indices" not in filter_state
    # A fresh callback with another k, a fresh DataModule: the resumed run re-applies the saved removal.
    again = DeepKNNPoisonFilter(k=3, layer="backbone.2", filter_epoch=1)
    decisions = []
    again.run_filter = lambda *args: decisions.append(args)  # a resumed run must not decide again
    rec = IndexRecorder()
    dm = _noisy_dm()
    resumed = single_trainer(tmp_path / "r", max_epochs=3, limit_val_batches=0, callbacks=[again, rec],
                             reload_dataloaders_every_n_epochs=1)
    resumed.fit(ForeignClassifier(), datamodule=dm, ckpt_path=str(saved[0]))
    assert decisions == [] and again.filtered_before_epoch == 1
    assert dm.excluded_train_indices == first
    for epoch in (1, 2):
        assert set(first).isdisjoint(rec.seen[epoch])


@pytest.mark.parametrize("method", ["l2_outlier", "one_class_svm", "random"])
def test_baseline_methods(tmp_path, method):
    filt = DeepKNNPoisonFilter(method=method, layer="backbone.2", filter_epoch=0, fraction=0.05, nu=0.05)
    dm = _noisy_dm()
    trainer = single_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[filt])
    trainer.fit(ForeignClassifier(), datamodule=dm)
    n = len(dm.train_dataset)
    assert 0 < len(filt.removed_indices) < 0.3 * n and dm.excluded_train_indices == filt.removed_indices
    if method != "one_class_svm":
        counts = torch.bincount(torch.tensor([int(dm.train_dataset[i][1]) for i in range(n)]))
        assert len(filt.removed_indices) == sum(round(0.05 * int(c)) for c in counts)


def test_missing_layer_k_too_large_and_unsupported_data(tmp_path):
    with pytest.raises(ValueError, match=r"layer 'backbone\.7' does not exist in ForeignClassifier"):
        single_trainer(tmp_path, max_epochs=1, callbacks=[DeepKNNPoisonFilter(layer="backbone.7")]).fit(
            ForeignClassifier(), datamodule=_noisy_dm())
    small = DigitsDataModule(val_fraction=0.0, with_index=True, classes=[0, 1], test_fraction=0.9)
    with pytest.raises(ValueError, match=r"k must be at most n - 1 = \d+ \(the training set has"):
        single_trainer(tmp_path, max_epochs=1, callbacks=[DeepKNNPoisonFilter(k=5000, layer="backbone.2")]).fit(
            ForeignClassifier(), datamodule=small)
    x, y = load_digits_tensors()
    plain = DataLoader(TensorDataset(x[:100], y[:100]), batch_size=50)
    with pytest.raises(TypeError, match=r"trainer.datamodule, which must be a lightning_robust RobustDataModule"):
        single_trainer(tmp_path, max_epochs=2, callbacks=[DeepKNNPoisonFilter(filter_epoch=0)]).fit(
            ForeignClassifier(), plain)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k must be a positive integer, got 0"),
        ({"method": "knn"}, "method must be one of"),
        ({"filter_epoch": -1}, "filter_epoch must be a non-negative integer"),
        ({"tie_break": "coin"}, "tie_break must be one of"),
        ({"fraction": 1.5}, r"fraction must lie in \[0, 1\)"),
        ({"normalized_k": -2.0}, "normalized_k must be a positive number"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepKNNPoisonFilter(**kwargs)

