"""MNIST-M (Ganin & Lempitsky 2015): MNIST digits blended over colour photo patches; reader and builder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from lightning_robust.datamodules.base import LoaderOptions
from lightning_robust.datamodules.formats import open_image, read_image_list
from lightning_robust.datamodules.image_datasets import ImageFileDataset
from lightning_robust.datamodules.integrity import DatasetNotFoundError, write_checksum_manifest
from lightning_robust.datamodules.mnist import read_mnist
from lightning_robust.datamodules.vision import LoadedDataset, VisionDataModule, manifest_dirs
from lightning_robust.utils.validation import check_positive_int

__all__ = ["MNISTMDataModule", "blend_mnist_m", "build_mnist_m"]

_FOLDER = "mnist_m"
_ARCHIVE = "mnist_m.tar.gz"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def blend_mnist_m(digits: np.ndarray, backgrounds: Sequence[np.ndarray], rng: np.random.Generator,
                  binarize: bool = False) -> np.ndarray:
    """Difference-blend grey digits over random patches of colour backgrounds.

    MNIST-M's definition (Ganin et al., JMLR 2016, arXiv:1505.07818, sec. 5.1.2): for a digit ``I1`` and a
    patch ``I2`` cropped at a random place of a random BSDS500 photo, ``out_ijk = |I1_ijk - I2_ijk|``, the
    grey digit replicated over the three channels.

    Args:
        digits: ``uint8 [N, H, W]`` grey digits.
        backgrounds: ``uint8 [h, w, 3]`` colour images, each at least ``H x W``.
        rng: NumPy generator choosing the photo and the patch position of each digit.
        binarize: use ``255 * (digit > 0)`` instead of the grey levels (the variant of the widely used
            TensorFlow DANN script ``create_mnistm.py``).

    Returns:
        ``uint8 [N, H, W, 3]`` images.
    """
    n, H, W = digits.shape
    for i, bg in enumerate(backgrounds):
        if bg.ndim != 3 or bg.shape[2] != 3 or bg.shape[0] < H or bg.shape[1] < W:
            raise ValueError(f"backgrounds[{i}] must be a colour image of at least {H}x{W}, got shape {bg.shape}")
    d = (digits > 0).astype(np.int16) * 255 if binarize else digits.astype(np.int16)
    out = np.empty((n, H, W, 3), dtype=np.uint8)
    for i in range(n):
        bg = backgrounds[int(rng.integers(0, len(backgrounds)))]
        y0 = int(rng.integers(0, bg.shape[0] - H + 1))
        x0 = int(rng.integers(0, bg.shape[1] - W + 1))
        patch = bg[y0:y0 + H, x0:x0 + W].astype(np.int16)
        out[i] = np.abs(patch - d[i][:, :, None]).astype(np.uint8)
    return out


def build_mnist_m(mnist_root: str | Path, backgrounds: str | Path, out_root: str | Path, seed: int = 0,
                  binarize: bool = False, splits: Sequence[str] = ("train", "test"), limit: int | None = None,
                  verify: bool = True, checksums: str | None = None) -> Path:
    """Build MNIST-M from MNIST and a folder of colour photos, in the distributed layout.

    The original MNIST-M used the BSDS500 training photos (``BSR/BSDS500/data/images/train/*.jpg`` of
    https://www2.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/resources.html); any folder of
    colour images at least 28x28 works. Digits come from :func:`~lightning_robust.datamodules.mnist.read_mnist`
    (checksum-verified). Writes ``out_root/mnist_m/mnist_m_{split}/NNNNNNNN.png``,
    ``mnist_m_{split}_labels.txt`` and an ``MD5SUMS`` manifest, which :class:`MNISTMDataModule` then verifies.
    The published MNIST-M has 59,001 / 9,001 images; a build has one image per MNIST digit (60,000 / 10,000).

    Args:
        mnist_root: folder with the MNIST IDX files (see :func:`~lightning_robust.datamodules.mnist.mnist_files`).
        backgrounds: folder searched recursively for ``.jpg``/``.jpeg``/``.png``/``.bmp`` photos.
        out_root: where ``mnist_m/`` is written.
        seed: seed of the photo and patch choices (the build is deterministic).
        binarize: see :func:`blend_mnist_m`.
        splits: MNIST splits to convert.
        limit: convert only the first ``limit`` digits of each split (for quick trials).
        verify, checksums: how MNIST is verified (see :func:`~lightning_robust.datamodules.mnist.read_mnist`).

    Returns:
        The ``mnist_m`` folder.

    Raises:
        DatasetNotFoundError: if MNIST or the photos are missing.
    """
    if limit is not None:
        check_positive_int("limit", limit)
    bg_dir = Path(backgrounds)
    files = sorted(p for p in bg_dir.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES) if bg_dir.is_dir() else []
    if not files:
        raise DatasetNotFoundError(f"no background photos (.jpg/.png) found under {bg_dir}; MNIST-M uses the "
                                   "BSDS500 training images (BSR/BSDS500/data/images/train)")
    bgs = [np.asarray(open_image(p, "RGB")) for p in files]
    folder = Path(out_root) / _FOLDER
    rng = np.random.default_rng(seed)
    for split in splits:
        x, y = read_mnist(mnist_root, split, verify=verify, checksums=checksums)
        if limit is not None:
            x, y = x[:limit], y[:limit]
        images = blend_mnist_m(x, bgs, rng, binarize)
        img_dir = folder / f"mnist_m_{split}"
        img_dir.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, (img, label) in enumerate(zip(images, y)):
            name = f"{i:08d}.png"
            Image.fromarray(img).save(img_dir / name)
            lines.append(f"{name} {int(label)}")
        (folder / f"mnist_m_{split}_labels.txt").write_text("\n".join(lines) + "\n")
    write_checksum_manifest(folder)
    return folder


class MNISTMDataModule(VisionDataModule):
    """MNIST-M: the target domain of MNIST -> MNIST-M adaptation (Ganin & Lempitsky 2015, arXiv:1409.7495).

    Reads the layout of the distributed ``mnist_m.tar.gz``: ``root/mnist_m/mnist_m_train/*.png``,
    ``mnist_m_train_labels.txt`` (``<file> <digit>`` lines), and the same for ``test`` (``root`` may also
    be the ``mnist_m`` folder itself). A local ``root/mnist_m.tar.gz`` is extracted once. There is no
    official checksum and no stable public URL (the authors share the archive through Google Drive), so
    ``download=True`` is refused with a pointer to the files, or to :func:`build_mnist_m`, which makes the
    data set from MNIST and BSDS500 and writes an ``MD5SUMS`` manifest that this module verifies.

    Args:
        root: folder holding ``mnist_m/`` (or ``mnist_m.tar.gz``).
        download: must stay ``False`` (see above).
        verify: check MD5s listed in an ``MD5SUMS`` manifest (or ``checksums``) before reading.
        checksums: an explicit ``md5sum``-format manifest.
        image_size: side of the yielded images (28 native; e.g. 32 for LeNet-style DA nets).
        channels: 3, or 1 for grey.
        augment: random crop after ``image_size // 14`` pixels of zero padding on the training view.
        classes, class_proportions, test_proportions, proportions_seed: class subsets and imbalanced
            mixtures (the NW domain-adaptation experiments).
        batch_size, eval_batch_size, num_workers, persistent_workers, pin_memory, val_fraction, seed,
            with_index, drop_last: see :class:`~lightning_robust.datamodules.RobustDataModule`.

    Raises:
        ValueError: on invalid arguments, including ``download=True``.
        DatasetNotFoundError / DataIntegrityError: from ``setup`` (missing or corrupt files, named).

    Example:
        >>> build_mnist_m("data", "BSR/BSDS500/data/images/train", "data")
        >>> target = MNISTMDataModule("data", image_size=32, class_proportions=[0.3] + [0.7 / 9] * 9)
    """

    dataset_name = "MNIST-M"
    layout = ("  {root}/mnist_m/mnist_m_train/00000000.png ..., {root}/mnist_m/mnist_m_train_labels.txt\n"
              "  {root}/mnist_m/mnist_m_test/00000000.png ...,  {root}/mnist_m/mnist_m_test_labels.txt\n"
              "  (or the archive {root}/mnist_m.tar.gz, extracted on first use)")
    source = ("mnist_m.tar.gz from the DANN project page (http://yaroslav.ganin.net/, 'MNIST-M'), or build it with "
              "lightning_robust.datamodules.build_mnist_m(mnist_root, bsds500_train_images, root)")
    download_supported = False

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        verify: bool = True,
        checksums: str | None = None,
        image_size: int = 28,
        channels: int = 3,
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

    @property
    def folder(self) -> Path:
        """The folder holding ``mnist_m_train/`` and the label files."""
        if (self.root / "mnist_m_train_labels.txt").is_file() or (self.root / "mnist_m_test_labels.txt").is_file():
            return self.root
        return self.root / _FOLDER

    def _manifest_dirs(self) -> list[Path]:
        return manifest_dirs(self.folder, self.root)

    def _prepare_files(self, download: bool) -> None:
        archive = self.root / _ARCHIVE
        if not self.folder.is_dir() and archive.is_file():
            self._extract(archive, self.root, _FOLDER)

    def _transform(self, train: bool) -> transforms.Compose:
        ops: list[Any] = []
        if self.image_size != 28:
            ops.append(transforms.Resize((self.image_size, self.image_size)))
        if train and self.augment:
            ops.append(transforms.RandomCrop(self.image_size, padding=max(1, round(self.image_size / 14))))
        ops.append(transforms.ToTensor())
        return transforms.Compose(ops)

    def _load(self, split: str) -> LoadedDataset | None:
        list_file = self.folder / f"mnist_m_{split}_labels.txt"
        img_dir = self.folder / f"mnist_m_{split}"
        missing = [p for p in (list_file, img_dir) if not p.exists()]
        if missing:
            raise self._not_found(missing, f"{split} files")
        self._verify([list_file])
        names, labels = read_image_list(list_file, 10)
        present = set(os.listdir(img_dir))
        absent = [img_dir / n for n in names if n not in present]
        if absent:
            raise self._not_found(absent, f"images ({len(absent)} listed in {list_file.name} but absent)")
        paths = [img_dir / n for n in names]
        self._verify(paths)
        return ImageFileDataset([str(p) for p in paths], torch.tensor(labels, dtype=torch.long),
                                self._transform(train=False), "L" if self.channels == 1 else "RGB")

    def _train_view(self, ds: LoadedDataset) -> LoadedDataset:
        return ds.with_transform(self._transform(train=True)) if isinstance(ds, ImageFileDataset) else ds
