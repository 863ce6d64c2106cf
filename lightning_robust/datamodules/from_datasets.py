"""A RobustDataModule around datasets you already have (for callbacks that act on the training set)."""

from __future__ import annotations

from typing import Unpack

from torch.utils.data import Dataset

from lightning_robust.datamodules.base import LoaderOptions, RobustDataModule

__all__ = ["DatasetDataModule"]


class DatasetDataModule(RobustDataModule):
    """Serve given map-style datasets through :class:`RobustDataModule`'s loaders, split and exclusion set.

    Callbacks that remove training samples (:class:`~lightning_robust.callbacks.DeepKNNPoisonFilter`) act on
    ``trainer.datamodule``; wrap plain datasets in this class to use them from any project.

    Args:
        train_dataset: the full training set (``val_fraction`` of it is held out by ``seed``); items
            ``(x, y, ...)``.
        test_dataset: optional test set.
        num_classes: optional class count (the :attr:`num_classes` property).
        **loader: the loader settings of :class:`~lightning_robust.datamodules.LoaderOptions`.

    Example:
        >>> dm = DatasetDataModule(TensorDataset(x, y), val_fraction=0.0, with_index=True, batch_size=100)
        >>> trainer.fit(model, datamodule=dm)
    """

    def __init__(self, train_dataset: Dataset, test_dataset: Dataset | None = None, num_classes: int | None = None,
                 **loader: Unpack[LoaderOptions]) -> None:
        super().__init__(**loader)
        for name, value in (("train_dataset", train_dataset), ("test_dataset", test_dataset)):
            if value is not None and not callable(getattr(value, "__getitem__", None)):
                raise TypeError(f"{name} must be a map-style dataset, got {type(value).__name__}")
        self._full, self._test, self._num_classes = train_dataset, test_dataset, num_classes

    @property
    def num_classes(self) -> int:
        if self._num_classes is None:
            raise AttributeError("DatasetDataModule was built without num_classes")
        return self._num_classes

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        return self._full, self._test
