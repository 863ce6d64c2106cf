"""One LightningDataModule per data set, all on :class:`RobustDataModule`."""

from lightning_robust.datamodules.base import IndexedDataset, RobustDataModule
from lightning_robust.datamodules.digits import DigitsDataModule, load_digits_tensors
from lightning_robust.datamodules.gaussian_mixture import GaussianMixtureDataModule, grid_mixture

__all__ = [
    "DigitsDataModule",
    "GaussianMixtureDataModule",
    "IndexedDataset",
    "RobustDataModule",
    "grid_mixture",
    "load_digits_tensors",
]
