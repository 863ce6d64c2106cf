"""CIFAR-10 from the official python batches, with checksums and a vectorised augmentation pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Unpack

import numpy as np
import torch

from lightning_robust.datamodules.base import LoaderOptions
from lightning_robust.datamodules.formats import load_cifar_batch, load_cifar_meta
from lightning_robust.datamodules.image_datasets import TensorImageDataset, resize_uint8, rgb_to_grey_uint8
from lightning_robust.datamodules.vision import LoadedDataset, VisionDataModule, manifest_dirs

__all__ = ["CIFAR10DataModule"]

_BATCHES = "cifar-10-batches-py"
_ARCHIVE = "cifar-10-python.tar.gz"
_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def _official_md5() -> tuple[dict[str, str], str]:
    # torchvision carries the publisher's MD5s; reading them from there keeps one source of truth.
    from torchvision.datasets import CIFAR10

    files = {name: md5 for name, md5 in [*CIFAR10.train_list, *CIFAR10.test_list]}
    files[CIFAR10.meta["filename"]] = CIFAR10.meta["md5"]
    return files, CIFAR10.tgz_md5


class CIFAR10DataModule(VisionDataModule):
    """CIFAR-10 (Krizhevsky 2009): 50,000 training and 10,000 test 32x32 colour images in 10 classes.

    Reads the official python version, ``root/cifar-10-batches-py/{data_batch_1..5, test_batch,
    batches.meta}`` (``root`` may also be that folder itself). If only the archive
    ``root/cifar-10-python.tar.gz`` is there it is verified and extracted once; ``download=True`` fetches it
    with torchvision's downloader. Every batch is checked against the official MD5 (or the ``checksums``
    manifest) and unpickled by an unpickler that admits NumPy arrays only.

    The training view uses the standard augmentation of the CIFAR literature: zero-pad 4 pixels, random
    32x32 crop, random horizontal flip (torchvision's ``RandomCrop(32, padding=4)`` +
    ``RandomHorizontalFlip()`` in distribution), vectorised over each batch; validation and test images
    are not augmented. Images are floats in [0, 1] (nets normalise themselves).

    Args:
        root: folder holding ``cifar-10-batches-py/`` (or the archive, or where to download it).
        download: download the archive if the batches are absent.
        verify: check MD5s before reading (official ones, or ``checksums``); structure is always checked.
        checksums: an ``md5sum``-format manifest replacing the official MD5s (for re-packed copies or
            generated test files); paths in it are relative to the manifest's folder.
        image_size: side of the yielded images; other than 32 they are resized once (bilinear, antialiased).
        channels: 3, or 1 for grey (PIL's luma formula).
        augment: random crop (padding ``image_size // 8``) and flip on the training view.
        classes: keep these classes (indices or names such as ``"cat"``), relabelled in the given order.
        class_proportions: class frequencies of an imbalanced subsample (one weight per kept class).
        test_proportions: apply ``class_proportions`` to the test set too (else only to train/val).
        proportions_seed: seed of the subsample (independent of ``seed``, which splits train/val).
        batch_size, eval_batch_size, num_workers, persistent_workers, pin_memory, val_fraction, seed,
            with_index, drop_last: see :class:`~lightning_robust.datamodules.RobustDataModule`.

    Raises:
        ValueError: on invalid arguments (at construction).
        DatasetNotFoundError: from ``setup`` when files are missing, naming them and the expected layout.
        DataIntegrityError: from ``setup`` on a checksum mismatch or a malformed batch, naming the file.

    Example:
        >>> dm = CIFAR10DataModule("data", download=True, batch_size=128, num_workers=4)
        >>> dm = CIFAR10DataModule("data", classes=["cat", "dog"], class_proportions=[0.8, 0.2])
    """

    dataset_name = "CIFAR-10"
    layout = ("  {root}/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta\n"
              "  (or the archive {root}/cifar-10-python.tar.gz, extracted on first use)")
    source = f"{_URL} (the 'CIFAR-10 python version', https://www.cs.toronto.edu/~kriz/cifar.html)"
    CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        verify: bool = True,
        checksums: str | None = None,
        image_size: int = 32,
        channels: int = 3,
        augment: bool = True,
        classes: Sequence[int | str] | None = None,
        class_proportions: Sequence[float] | None = None,
        test_proportions: bool = True,
        proportions_seed: int = 0,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(root=root, download=download, verify=verify, checksums=checksums, image_size=image_size,
                         channels=channels, augment=augment, classes=classes, class_proportions=class_proportions,
                         test_proportions=test_proportions, proportions_seed=proportions_seed, **loader)
        self.save_hyperparameters()

    def native_class_names(self) -> list[str]:
        return list(self.CLASS_NAMES)

    @property
    def folder(self) -> Path:
        """The folder holding the batches."""
        if self.root.name == _BATCHES or (self.root / "data_batch_1").is_file():
            return self.root
        return self.root / _BATCHES

    def _files(self, split: str) -> list[Path]:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        return [self.folder / n for n in [*names, "batches.meta"]]

    def _official_checksums(self) -> dict[Path, str]:
        files, tgz = _official_md5()
        out = {self.folder / n: m for n, m in files.items()}
        out[self.root / _ARCHIVE] = tgz
        return out

    def _manifest_dirs(self) -> list[Path]:
        return manifest_dirs(self.folder, self.root)

    def _prepare_files(self, download: bool) -> None:
        if all(p.is_file() for p in self._files("train") + self._files("test")):
            return
        archive = self.root / _ARCHIVE
        if not archive.is_file() and download:
            self._download(_URL, self.root, _ARCHIVE)
        if archive.is_file() and not self.folder.is_dir():
            self._extract(archive, self.root, _BATCHES)

    def _load(self, split: str) -> LoadedDataset:
        files = self._files(split)
        missing = [p for p in files if not p.is_file()]
        if missing:
            raise self._not_found(missing, f"{split} batches")
        self._verify(files)
        load_cifar_meta(files[-1])
        parts = [load_cifar_batch(p) for p in files[:-1]]
        x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        x = resize_uint8(x, self.image_size)
        if self.channels == 1:
            x = rgb_to_grey_uint8(x)
        return TensorImageDataset(x.contiguous(), y)

    def _train_view(self, ds: LoadedDataset) -> LoadedDataset:
        if self.augment and isinstance(ds, TensorImageDataset):
            return ds.augmented(pad=max(1, round(self.image_size / 8)), flip=True)
        return ds
