"""Two DataModules as one: labelled source batches paired with (unlabelled) target batches."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader

from lightning_robust.utils.checkpoint import WeightsOnlyLoadFromCheckpoint
from lightning_robust.utils.validation import check_choice

__all__ = ["DomainAdaptationDataModule"]


class DomainAdaptationDataModule(WeightsOnlyLoadFromCheckpoint, pl.LightningDataModule):  # type: ignore[misc]  # weights-only override
    """Pair a source and a target DataModule for unsupervised domain adaptation.

    Training batches are ``{"source": batch_s, "target": batch_t}`` from Lightning's
    :class:`~pytorch_lightning.utilities.CombinedLoader` (``max_size_cycle``: an epoch runs through the
    longer loader while the shorter one restarts; under DDP each loader is sharded as usual). Target labels
    travel with the batches but adaptation methods must not train on them. Validation and test yield the
    target's loader first (``dataloader_idx`` 0: the metric that matters) and the source's second.

    Args:
        source: the labelled domain (e.g. ``MNISTDataModule``, VisDA ``train``).
        target: the unlabelled domain (e.g. ``MNISTMDataModule``, VisDA ``validation``).
        mode: ``CombinedLoader`` mode for training: ``"max_size_cycle"`` or ``"min_size"``.

    Raises:
        ValueError: if the two domains have different numbers of classes, or on an unknown mode.

    Example:
        >>> dm = DomainAdaptationDataModule(MNISTDataModule("data", channels=3),
        ...                                 MNISTMDataModule("data"))
    """

    def __init__(self, source: pl.LightningDataModule, target: pl.LightningDataModule,
                 mode: str = "max_size_cycle") -> None:
        super().__init__()
        check_choice("mode", mode, ("max_size_cycle", "min_size"))
        ks, kt = getattr(source, "num_classes", None), getattr(target, "num_classes", None)
        if ks is not None and kt is not None and ks != kt:
            raise ValueError(f"source and target must have the same classes, got {ks} and {kt} classes")
        self.source, self.target, self.mode = source, target, mode
        self.save_hyperparameters(ignore=["source", "target"])

    @property
    def num_classes(self) -> int:
        return int(self.source.num_classes)  # type: ignore[attr-defined]

    def prepare_data(self) -> None:
        self.source.prepare_data()
        self.target.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for dm in (self.source, self.target):
            dm.trainer = self.trainer
            dm.setup(stage)  # type: ignore[arg-type]  # our DataModules accept None

    def train_dataloader(self) -> CombinedLoader:
        return CombinedLoader({"source": self.source.train_dataloader(), "target": self.target.train_dataloader()},
                              mode=self.mode)  # type: ignore[arg-type]  # validated in __init__

    def _both(self, split: str) -> list[DataLoader]:
        loaders = []
        for dm in (self.target, self.source):
            try:
                loaders.append(getattr(dm, f"{split}_dataloader")())
            except RuntimeError:  # that domain has no such split (e.g. val_fraction=0)
                if dm is self.target:
                    raise
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._both("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._both("test")

    def predict_dataloader(self) -> DataLoader:
        return self.target.test_dataloader()

    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "target": self.target.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.source.load_state_dict(state_dict.get("source", {}))
        self.target.load_state_dict(state_dict.get("target", {}))
