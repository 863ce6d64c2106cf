"""MNIST from the original IDX files (raw or ``.gz``), with the official checksums."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Unpack

import numpy as np
import torch

from lightning_robust.datamodules.base import LoaderOptions
from lightning_robust.datamodules.formats import read_idx
from lightning_robust.datamodules.image_datasets import TensorImageDataset, resize_uint8
from lightning_robust.datamodules.integrity import (
    ChecksumTable,
    DataIntegrityError,
    DatasetNotFoundError,
    verify_checksums,
)
from lightning_robust.datamodules.vision import LoadedDataset, VisionDataModule, manifest_dirs

__all__ = ["MNISTDataModule", "mnist_files", "read_mnist"]

_PREFIX = {"train": "train", "test": "t10k"}
# MD5 of the uncompressed IDX files, as published alongside the originals (the `.gz` MD5s come from
# torchvision). Three of the four were checked against the real files in ../shared/data.
_RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def _gz_md5() -> dict[str, str]:
    from torchvision.datasets import MNIST

    return dict(MNIST.resources)


def _candidate_dirs(root: Path) -> list[Path]:
    # torchvision's layout (root/MNIST/raw), its raw folder given directly, or a flat folder.
    return [root / "MNIST" / "raw", root / "raw", root]


def mnist_files(root: str | Path, split: str) -> tuple[Path, Path] | None:
    """``(images, labels)`` paths of an MNIST split under ``root``, or ``None`` if not found.

    Looks in ``root/MNIST/raw`` (torchvision's layout), ``root/raw`` and ``root`` itself, for the
    uncompressed files first and the ``.gz`` ones otherwise.
    """
    root = Path(root)
    prefix = _PREFIX[split]
    for folder in _candidate_dirs(root):
        found = []
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte"
            path = next((folder / (name + s) for s in ("", ".gz") if (folder / (name + s)).is_file()), None)
            found.append(path)
        if found[0] is not None and found[1] is not None:
            return found[0], found[1]
    return None


def _missing_files(root: Path, split: str) -> list[Path]:
    """The files of ``split`` missing from the folder that holds some MNIST files (torchvision's
    ``root/MNIST/raw`` when none does), so the error names what is really absent."""
    prefix = _PREFIX[split]
    names = [f"{prefix}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
    any_mnist = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")

    def present(folder: Path, name: str) -> bool:
        return any((folder / (name + s)).is_file() for s in ("", ".gz"))

    dirs = _candidate_dirs(root)
    folder = next((d for d in dirs if any(present(d, n) for n in names)), None)
    folder = folder or next((d for d in dirs if any(present(d, f"{n}-ubyte") for n in any_mnist)), dirs[0])
    return [folder / f"{n}[.gz]" for n in names if not present(folder, n)]


def load_mnist_arrays(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read and cross-check an MNIST image/label file pair: ``(uint8 [N, 28, 28], int64 [N])``."""
    x = read_idx(images)
    y = read_idx(labels)
    if x.ndim != 3 or x.dtype != np.uint8:
        raise DataIntegrityError(f"{images}: expected unsigned-byte images [N, rows, cols], got {x.dtype} {x.shape}")
    if y.ndim != 1 or y.dtype != np.uint8:
        raise DataIntegrityError(f"{labels}: expected unsigned-byte labels [N], got {y.dtype} {y.shape}")
    if len(x) != len(y):
        raise DataIntegrityError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    if y.size and y.max() > 9:
        raise DataIntegrityError(f"{labels}: labels must lie in 0..9, found {int(y.max())}")
    return x, y.astype(np.int64)


def official_mnist_checksums(root: str | Path) -> dict[Path, str]:
    """The official MD5 of every MNIST file name (``.gz`` and raw) in each folder searched under ``root``."""
    out: dict[Path, str] = {}
    for folder in _candidate_dirs(Path(root)):
        out.update({folder / n: m for n, m in _gz_md5().items()})
        out.update({folder / n: m for n, m in _RAW_MD5.items()})
    return out


def read_mnist(root: str | Path, split: str = "test", verify: bool = True,
               checksums: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Locate, verify and read one MNIST split: ``(images uint8 [N, 28, 28], labels int64 [N])``.

    Args:
        root: folder searched as in :func:`mnist_files`.
        split: ``"train"`` or ``"test"``.
        verify: check the official MD5s (or ``checksums``) first.
        checksums: an ``md5sum``-format manifest replacing the official MD5s.

    Raises:
        DatasetNotFoundError: if the split's files are absent (naming the expected layout).
        DataIntegrityError: on a checksum mismatch or a malformed file, naming it.
    """
    if split not in _PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    found = mnist_files(root, split)
    if found is None:
        missing = ", ".join(str(p) for p in _missing_files(Path(root), split))
        raise DatasetNotFoundError(f"MNIST {split} files not found under {root}: missing {missing}; expected layout:\n"
                                   + MNISTDataModule.layout.format(root=root))
    table = ChecksumTable(official_mnist_checksums(root), checksums, _candidate_dirs(Path(root)), enabled=verify)
    verify_checksums(found, table, f"If it is damaged, fetch it again: {MNISTDataModule.source}. For a copy of your "
                     "own, pass checksums= an md5sum manifest (write_checksum_manifest) or verify=False.")
    return load_mnist_arrays(*found)


class MNISTDataModule(VisionDataModule):
    """MNIST (LeCun et al. 1998): 60,000 training and 10,000 test 28x28 grey digits.

    Reads the original IDX files, raw or gzipped, from ``root/MNIST/raw/`` (torchvision's layout),
    ``root/raw/`` or ``root/`` itself. ``download=True`` fetches the missing ``.gz`` files from
    torchvision's mirrors into ``root/MNIST/raw``. Files are checked against the official MD5s (of the
    ``.gz`` and of the uncompressed files), or against a ``checksums`` manifest; the IDX header must
    match the file length, so truncation is reported even with ``verify=False``.

    Args:
        root: folder holding the IDX files (see above).
        download: download missing files.
        verify: check MD5s before reading; structure is always checked.
        checksums: an ``md5sum``-format manifest replacing the official MD5s.
        image_size: side of the yielded images; other than 28 they are resized once (bilinear, antialiased).
        channels: 1, or 3 (grey replicated, e.g. for MNIST -> MNIST-M adaptation).
        augment: random crop after ``image_size // 14`` pixels of zero padding on the training view (off by
            default: the MNIST literature trains without augmentation).
        classes, class_proportions, test_proportions, proportions_seed: class subsets and imbalanced
            mixtures, as in :class:`~lightning_robust.datamodules.CIFAR10DataModule`.
        batch_size, eval_batch_size, num_workers, persistent_workers, pin_memory, val_fraction, seed,
            with_index, drop_last: see :class:`~lightning_robust.datamodules.RobustDataModule`.

    Raises:
        ValueError: on invalid arguments.
        DatasetNotFoundError / DataIntegrityError: from ``setup``, naming the file or the expected layout.

    Example:
        >>> dm = MNISTDataModule("data", download=True, image_size=32, channels=3)
        >>> dm.setup("test"); len(dm.test_dataset)
        10000
    """

    dataset_name = "MNIST"
    layout = ("  {root}/\n"
              "  └── MNIST/\n"
              "      └── raw/\n"
              "          ├── train-images-idx3-ubyte[.gz]\n"
              "          ├── train-labels-idx1-ubyte[.gz]\n"
              "          ├── t10k-images-idx3-ubyte[.gz]\n"
              "          └── t10k-labels-idx1-ubyte[.gz]\n"
              "  (torchvision's layout; the same four files directly in {root}/ or {root}/raw/ also work)")
    source = ("the four .gz files of https://ossci-datasets.s3.amazonaws.com/mnist/ "
              "(originally yann.lecun.com/exdb/mnist)")

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        verify: bool = True,
        checksums: str | None = None,
        image_size: int = 28,
        channels: int = 1,
        augment: bool = False,
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
        return [str(d) for d in range(10)]

    def _official_checksums(self) -> dict[Path, str]:
        return official_mnist_checksums(self.root)

    def _manifest_dirs(self) -> list[Path]:
        return manifest_dirs(*_candidate_dirs(self.root))

    def _prepare_files(self, download: bool) -> None:
        if not download or all(mnist_files(self.root, s) is not None for s in ("train", "test")):
            return
        from torchvision.datasets import MNIST

        folder = self.root / "MNIST" / "raw"
        for split in ("train", "test"):
            if mnist_files(self.root, split) is not None:
                continue
            for kind in ("images-idx3", "labels-idx1"):
                name = f"{_PREFIX[split]}-{kind}-ubyte.gz"
                errors = []
                for mirror in MNIST.mirrors:
                    try:
                        self._download(mirror + name, folder, name)
                        break
                    except DatasetNotFoundError as err:
                        errors.append(str(err).splitlines()[0].split(". Place the file")[0])
                else:
                    tried = "\n".join(f"  - {e}" for e in errors)
                    raise DatasetNotFoundError(f"could not download {name} from any of the {len(errors)} mirrors:\n"
                                               f"{tried}\nPlace the files yourself; expected layout:\n"
                                               + self.layout.format(root=self.root))

    def _load(self, split: str) -> LoadedDataset:
        found = mnist_files(self.root, split)
        if found is None:
            raise self._not_found(_missing_files(self.root, split), f"{split} files")
        self._verify(found)
        x_np, y_np = load_mnist_arrays(*found)
        x = resize_uint8(torch.from_numpy(x_np.copy()).unsqueeze(1), self.image_size)
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return TensorImageDataset(x.contiguous(), torch.from_numpy(y_np))

    def _train_view(self, ds: LoadedDataset) -> LoadedDataset:
        if self.augment and isinstance(ds, TensorImageDataset):
            return ds.augmented(pad=max(1, round(self.image_size / 14)), flip=False)
        return ds
