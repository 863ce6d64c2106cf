"""VisDA-2017 classification: synthetic renderings (``train/``) and real COCO crops (``validation/``)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Unpack

import torch
from torchvision import transforms

from lightning_robust.datamodules.base import LoaderOptions
from lightning_robust.datamodules.formats import read_image_list
from lightning_robust.datamodules.image_datasets import ImageFileDataset
from lightning_robust.datamodules.integrity import DataIntegrityError
from lightning_robust.datamodules.vision import LoadedDataset, VisionDataModule, manifest_dirs
from lightning_robust.utils.validation import check_choice, check_fraction

__all__ = ["VisDADataModule"]

_URL = "http://csr.bu.edu/ftp/visda17/clf/{domain}.tar"
DOMAINS = ("train", "validation")
# A fixed generator for the held-out test part when train and test come from the same domain, so that
# changing `seed` (the train/val split) never moves test images into training.
_TEST_SPLIT_SEED = 20170901


class VisDADataModule(VisionDataModule):
    """VisDA-2017 classification (Peng et al. 2017, arXiv:1710.06924): 12 object classes in two domains.

    ``train/`` holds 152,397 synthetic renderings of 3-D models (the usual *source* domain),
    ``validation/`` 55,388 real object crops from COCO (the usual *target*). Each domain folder holds an
    ``image_list.txt`` of ``<relative image path> <label>`` lines, labels 0..11 in the order of
    :attr:`CLASS_NAMES`; a path whose first folder is a class name must carry that class's label (a
    cheap consistency check of the list). Archives ``root/train.tar`` / ``root/validation.tar`` are
    extracted once if the folders are absent; ``download=True`` fetches them from the organisers' server
    (no official checksums exist: run :func:`~lightning_robust.datamodules.write_checksum_manifest` on
    ``root`` afterwards and later corruption is caught; the images are decoded in full when read either way).

    Transforms (the domain-adaptation literature's for ImageNet-style nets): resize to
    ``round(image_size * 256 / 224)`` square, then a random ``image_size`` crop and horizontal flip for
    training (``augment``) or a centre crop for evaluation.

    Args:
        root: folder holding ``train/`` and ``validation/`` (or their ``.tar`` archives).
        download: download missing domains.
        verify: check MD5s listed in an ``MD5SUMS`` manifest (or ``checksums``) before reading.
        checksums: an explicit ``md5sum``-format manifest.
        image_size: side of the yielded square images (224 for ResNets).
        channels: 3, or 1 for grey.
        augment: random crop + flip on the training view.
        domain: domain of the training (and validation) images: ``"train"`` (synthetic) or ``"validation"``
            (real).
        test_domain: domain of the test set: ``"validation"`` (the standard synthetic -> real protocol),
            ``"train"``, or ``None`` for no test set. When equal to ``domain``, a fixed ``test_fraction`` of
            that domain is held out as the test set.
        test_fraction: share held out for testing when ``test_domain == domain``.
        classes: keep these classes (indices or names such as ``"car"``), relabelled in the given order.
        class_proportions, test_proportions, proportions_seed: imbalanced mixtures (NW experiments).
        batch_size, eval_batch_size, num_workers, persistent_workers, pin_memory, val_fraction, seed,
            with_index, drop_last: see :class:`~lightning_robust.datamodules.RobustDataModule`.

    Raises:
        ValueError: on invalid arguments.
        DatasetNotFoundError / DataIntegrityError: from ``setup`` (missing or corrupt files, named).

    Example:
        >>> source = VisDADataModule("data/visda", domain="train", classes=["aeroplane", "horse", "truck"])
        >>> target = VisDADataModule("data/visda", domain="validation", classes=["aeroplane", "horse", "truck"],
        ...                          class_proportions=[0.6, 0.3, 0.1])
    """

    dataset_name = "VisDA-2017"
    layout = ("  {root}/train/image_list.txt and {root}/train/<class>/*.png         (synthetic)\n"
              "  {root}/validation/image_list.txt and {root}/validation/<class>/*.jpg (real)\n"
              "  (or the archives {root}/train.tar, {root}/validation.tar, extracted on first use)")
    source = ("http://csr.bu.edu/ftp/visda17/clf/train.tar and validation.tar "
              "(see https://github.com/VisionLearningGroup/taskcv-2017-public/tree/master/classification)")
    CLASS_NAMES = ("aeroplane", "bicycle", "bus", "car", "horse", "knife", "motorcycle", "person", "plant",
                   "skateboard", "train", "truck")

    loader_defaults: ClassVar[LoaderOptions] = {"batch_size": 64}

    def __init__(
        self,
        root: str = "data/visda",
        download: bool = False,
        verify: bool = True,
        checksums: str | None = None,
        image_size: int = 224,
        channels: int = 3,
        augment: bool = True,
        domain: str = "train",
        test_domain: str | None = "validation",
        test_fraction: float = 0.2,
        classes: Sequence[int | str] | None = None,
        class_proportions: Sequence[float] | None = None,
        test_proportions: bool = True,
        proportions_seed: int = 0,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(root=root, download=download, verify=verify, checksums=checksums, image_size=image_size,
                         channels=channels, augment=augment, classes=classes, class_proportions=class_proportions,
                         test_proportions=test_proportions, proportions_seed=proportions_seed, **loader)
        check_choice("domain", domain, DOMAINS)
        if test_domain is not None:
            check_choice("test_domain", test_domain, DOMAINS)
        check_fraction("test_fraction", test_fraction)
        self.domain, self.test_domain, self.test_fraction = domain, test_domain, test_fraction
        self.resize_size = round(image_size * 256 / 224)
        self._lists: dict[str, tuple[list[str], list[int]]] = {}
        self.save_hyperparameters()

    def native_class_names(self) -> list[str]:
        return list(self.CLASS_NAMES)

    def _domains(self) -> list[str]:
        return [self.domain] + ([self.test_domain] if self.test_domain not in (None, self.domain) else [])

    def _manifest_dirs(self) -> list[Path]:
        return manifest_dirs(self.root, *(self.root / d for d in DOMAINS))

    def _prepare_files(self, download: bool) -> None:
        for d in self._domains():
            if (self.root / d / "image_list.txt").is_file():
                continue
            archive = self.root / f"{d}.tar"
            if not archive.is_file() and download:
                self._download(_URL.format(domain=d), self.root, archive.name)
            if archive.is_file() and not (self.root / d).is_dir():
                self._extract(archive, self.root, d)

    def _read_domain(self, d: str) -> tuple[list[str], list[int]]:
        if d in self._lists:
            return self._lists[d]
        folder = self.root / d
        list_file = folder / "image_list.txt"
        if not list_file.is_file():
            raise self._not_found([list_file], f"'{d}' domain")
        self._verify([list_file])
        rel, labels = read_image_list(list_file, len(self.CLASS_NAMES))
        paths: list[str] = []
        for lineno, (r, y) in enumerate(zip(rel, labels), 1):
            first = Path(r).parts[0] if Path(r).parts else ""
            if first in self.CLASS_NAMES and self.CLASS_NAMES.index(first) != y:
                raise DataIntegrityError(f"{list_file}, entry {lineno}: {r} lies in the '{first}' folder but has "
                                         f"label {y} ('{self.CLASS_NAMES[y]}'); the list is corrupted")
            paths.append(r if os.path.isabs(r) else str(folder / r))
        by_dir: dict[str, set[str]] = defaultdict(set)
        for p in paths:
            by_dir[os.path.dirname(p)].add(os.path.basename(p))
        absent: list[Path] = []
        for dirname, names in by_dir.items():
            present = set(os.listdir(dirname)) if os.path.isdir(dirname) else set()
            absent += [Path(dirname) / n for n in sorted(names - present)]
        if absent:
            raise self._not_found(absent, f"images ({len(absent)} listed in {list_file} but absent)")
        self._verify(map(Path, paths))
        self._lists[d] = (paths, labels)
        return paths, labels

    def _transform(self, train: bool) -> transforms.Compose:
        ops: list[Any] = [transforms.Resize((self.resize_size, self.resize_size))]
        if train and self.augment:
            ops += [transforms.RandomCrop(self.image_size), transforms.RandomHorizontalFlip()]
        else:
            ops.append(transforms.CenterCrop(self.image_size))
        ops.append(transforms.ToTensor())
        return transforms.Compose(ops)

    def _dataset(self, d: str, part: str) -> ImageFileDataset:
        paths, labels = self._read_domain(d)
        idx = torch.arange(len(paths))
        if self.test_domain == self.domain:
            perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(_TEST_SPLIT_SEED))
            n_test = round(self.test_fraction * len(paths))
            idx = (perm[:n_test] if part == "test" else perm[n_test:]).sort().values
        ds = ImageFileDataset(paths, torch.tensor(labels, dtype=torch.long), self._transform(train=False),
                              "L" if self.channels == 1 else "RGB")
        return ds.select(idx)

    def _load(self, split: str) -> LoadedDataset | None:
        if split == "train":
            return self._dataset(self.domain, "train")
        return self._dataset(self.test_domain, "test") if self.test_domain is not None else None

    def _train_view(self, ds: LoadedDataset) -> LoadedDataset:
        return ds.with_transform(self._transform(train=True)) if isinstance(ds, ImageFileDataset) else ds
