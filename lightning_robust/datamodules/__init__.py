"""One LightningDataModule per data set, all on :class:`RobustDataModule`."""

from lightning_robust.datamodules.base import IndexedDataset, LoaderOptions, RobustDataModule
from lightning_robust.datamodules.celeba import CelebADataModule
from lightning_robust.datamodules.cifar10 import CIFAR10DataModule
from lightning_robust.datamodules.colored_digits import ColoredDigitsDataModule, colorize_digits
from lightning_robust.datamodules.digits import DigitsDataModule, load_digits_tensors
from lightning_robust.datamodules.domain_adaptation import DomainAdaptationDataModule
from lightning_robust.datamodules.filtered import FilteredDataset
from lightning_robust.datamodules.from_datasets import DatasetDataModule
from lightning_robust.datamodules.gaussian_mixture import GaussianMixtureDataModule, grid_mixture
from lightning_robust.datamodules.image_datasets import (
    ImageFileDataset,
    TensorImageDataset,
    proportional_subsample,
    random_crop_flip,
)
from lightning_robust.datamodules.imdb import IMDBDataModule, PadCollate, TokenizedTextDataset, read_imdb, safe_extract
from lightning_robust.datamodules.integrity import (
    DataIntegrityError,
    DatasetNotFoundError,
    read_checksum_manifest,
    write_checksum_manifest,
)
from lightning_robust.datamodules.mnist import MNISTDataModule, read_mnist
from lightning_robust.datamodules.mnist_m import MNISTMDataModule, blend_mnist_m, build_mnist_m
from lightning_robust.datamodules.poisoned import PoisonedDataModule, PoisonSwapDataset, dataset_labels
from lightning_robust.datamodules.visda import VisDADataModule
from lightning_robust.datamodules.vision import VisionDataModule

__all__ = [
    "CIFAR10DataModule",
    "CelebADataModule",
    "ColoredDigitsDataModule",
    "DataIntegrityError",
    "DatasetDataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "DomainAdaptationDataModule",
    "FilteredDataset",
    "GaussianMixtureDataModule",
    "IMDBDataModule",
    "ImageFileDataset",
    "IndexedDataset",
    "LoaderOptions",
    "MNISTDataModule",
    "MNISTMDataModule",
    "PadCollate",
    "PoisonSwapDataset",
    "PoisonedDataModule",
    "RobustDataModule",
    "TensorImageDataset",
    "TokenizedTextDataset",
    "VisDADataModule",
    "VisionDataModule",
    "blend_mnist_m",
    "build_mnist_m",
    "colorize_digits",
    "dataset_labels",
    "grid_mixture",
    "load_digits_tensors",
    "proportional_subsample",
    "random_crop_flip",
    "read_checksum_manifest",
    "read_imdb",
    "read_mnist",
    "safe_extract",
    "write_checksum_manifest",
]
