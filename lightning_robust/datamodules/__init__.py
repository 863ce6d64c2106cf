"""One LightningDataModule per data set, all on :class:`RobustDataModule`."""

from lightning_robust.datamodules.base import IndexedDataset, RobustDataModule
from lightning_robust.datamodules.digits import DigitsDataModule, load_digits_tensors
from lightning_robust.datamodules.filtered import FilteredDataset
from lightning_robust.datamodules.gaussian_mixture import GaussianMixtureDataModule, grid_mixture
from lightning_robust.datamodules.poisoned import PoisonedDataModule, PoisonSwapDataset, dataset_labels

__all__ = [
    "DigitsDataModule",
    "FilteredDataset",
    "GaussianMixtureDataModule",
    "IndexedDataset",
    "PoisonSwapDataset",
    "PoisonedDataModule",
    "RobustDataModule",
    "dataset_labels",
    "grid_mixture",
    "load_digits_tensors",
]
