"""Two DataModules as one: labelled source batches paired with (unlabelled) target batches."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, Subset

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
        classwise_source: also yield ``"source_by_class"``: a list of ``K`` batches, batch ``k`` drawn from
            the source's class ``k`` alone (shuffled, same batch size as the source's loader, each restarting
            when exhausted). This is how the authors of arXiv 1902.00415 estimate the source mixture
            ``Σ_k π_k E_{s|k}[D]`` (one class-wise loader per class): every component is estimated from a full
            batch however rare its class, instead of from the few samples a mixed batch holds.
            :class:`~lightning_robust.models.NWDomainAdaptation` uses them when present.

    Raises:
        ValueError: if the two domains have different numbers of classes, or on an unknown mode; with
            ``classwise_source``, at setup, if a source class has no training sample.

    Example:
        >>> dm = DomainAdaptationDataModule(MNISTDataModule("data", channels=3),
        ...                                 MNISTMDataModule("data"))
    """

    def __init__(self, source: pl.LightningDataModule, target: pl.LightningDataModule,
                 mode: str = "max_size_cycle", classwise_source: bool = False) -> None:
        super().__init__()
        check_choice("mode", mode, ("max_size_cycle", "min_size"))
        if not isinstance(classwise_source, bool):
            raise ValueError(f"classwise_source must be a bool, got {classwise_source!r}")
        self.classwise_source = classwise_source
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
        source = self.source.train_dataloader()
        loaders: dict[str, Any] = {"source": source, "target": self.target.train_dataloader()}
        if self.classwise_source:
            loaders["source_by_class"] = self._classwise_loaders(source)
        return CombinedLoader(loaders, mode=self.mode)  # type: ignore[arg-type]  # validated in __init__

    def _classwise_loaders(self, source: DataLoader) -> list[DataLoader]:
        """One shuffled loader per source class, over the source loader's dataset."""
        dataset: Dataset = source.dataset
        labels = _labels_of(dataset)
        k = int(getattr(self.source, "num_classes", 0) or (int(labels.max()) + 1))
        counts = torch.bincount(labels, minlength=k)
        if bool((counts[:k] == 0).any()):
            empty = torch.nonzero(counts[:k] == 0).flatten().tolist()
            raise ValueError(f"classwise_source needs training samples of every source class; classes {empty} "
                             "have none")
        batch_size = source.batch_size or 1
        g = torch.Generator().manual_seed(int(getattr(self.source, "seed", 0) or 0))
        return [DataLoader(Subset(dataset, torch.nonzero(labels == c).flatten().tolist()), batch_size=batch_size,
                           shuffle=True, generator=g, num_workers=0) for c in range(k)]

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


def _labels_of(dataset: Dataset) -> torch.Tensor:
    """The class label of every item of ``dataset`` (``TensorDataset`` and ``Subset`` of one read directly)."""
    inner: Dataset = dataset
    index = None
    if isinstance(dataset, Subset):
        inner, index = dataset.dataset, torch.as_tensor(list(dataset.indices), dtype=torch.long)
    tensors = getattr(inner, "tensors", None)
    if isinstance(tensors, tuple) and len(tensors) >= 2:
        y = tensors[1].long().reshape(-1)
        return y if index is None else y[index]
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]
