"""One LightningDataModule per data set, all on :class:`RobustDataModule`."""

from lightning_robust.datamodules.base import IndexedDataset, RobustDataModule
from lightning_robust.datamodules.digits import DigitsDataModule, load_digits_tensors
from lightning_robust.datamodules.gaussian_mixture import GaussianMixtureDataModule, grid_mixture
from lightning_robust.datamodules.imdb import IMDBDataModule, PadCollate, TokenizedTextDataset, read_imdb, safe_extract

__all__ = [
    "DigitsDataModule",
    "GaussianMixtureDataModule",
    "IMDBDataModule",
    "IndexedDataset",
    "PadCollate",
    "RobustDataModule",
    "TokenizedTextDataset",
    "grid_mixture",
    "load_digits_tensors",
    "read_imdb",
    "safe_extract",
]
