"""CelebA aligned-and-cropped faces with their attribute annotations and official partition."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import torch
from torchvision import transforms

from lightning_robust.datamodules.base import LoaderOptions
from lightning_robust.datamodules.formats import read_celeba_attributes, read_celeba_column
from lightning_robust.datamodules.image_datasets import ImageFileDataset
from lightning_robust.datamodules.integrity import DataIntegrityError, DatasetNotFoundError
from lightning_robust.datamodules.vision import LoadedDataset, VisionDataModule, manifest_dirs
from lightning_robust.utils.validation import check_positive_int

__all__ = ["CELEBA_ATTRIBUTES", "CelebADataModule"]

_IMAGES = "img_align_celeba"
_ZIP = "img_align_celeba.zip"
_PARTITION = {"train": 0, "val": 1, "test": 2}
#: The 40 attributes of ``list_attr_celeba.txt``, in file order.
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)


def _torchvision_file_list() -> list[tuple[str, str, str]]:
    from torchvision.datasets import CelebA

    return list(CelebA.file_list)


class CelebADataModule(VisionDataModule):
    """CelebA (Liu et al. 2015): 202,599 aligned 178x218 face images with 40 binary attributes.

    Reads torchvision's layout ``root/celeba/`` (or ``root/`` itself): ``img_align_celeba/*.jpg``,
    ``list_attr_celeba.txt``, ``list_eval_partition.txt``, and ``identity_CelebA.txt`` when identities
    are the target. The official partition gives train (162,770) / val (19,867) / test (19,962); set
    ``official_val=False`` to split ``val_fraction`` off the training partition instead. If only
    ``img_align_celeba.zip`` is present it is verified and extracted once; ``download=True`` uses
    torchvision's Google-Drive downloader (needs ``gdown``; Drive quotas often refuse it, in which case
    download the files by hand from the project page).

    The annotation files and the zip are checked against the official MD5s (or a ``checksums``
    manifest); the annotation files are parsed line by line and every listed image must exist. The
    images themselves have no official checksums: each is decoded in full when read, so a truncated or
    undecodable image raises an error naming it; list the images in a manifest to catch silent
    corruption too.

    Transform (the GAN literature's, e.g. DCGAN / WGAN-GP on CelebA): centre crop ``crop_size`` (178, the
    largest centred square), resize to ``image_size`` (64); training adds a random horizontal flip when
    ``augment``. Images are floats in [0, 1].

    Args:
        root: folder holding ``celeba/`` (or the CelebA files directly).
        download: download missing files (torchvision's Google-Drive downloader).
        verify: check MD5s before reading; structure is always checked.
        checksums: an ``md5sum``-format manifest replacing the official MD5s.
        image_size: side of the yielded square images.
        channels: 3, or 1 for grey.
        augment: random horizontal flips on the training view.
        crop_size: side of the centre crop taken before resizing (``None``: no crop, resize the whole image
            to a square).
        target: ``"attr"`` (the 40 attributes as a 0/1 vector), ``"identity"`` (identity number - 1, so that
            labels start at 0), ``"none"``
            (always 0: unconditional GANs) or an attribute name such as ``"Smiling"`` (a 2-class label:
            0 = without, 1 = with; classes and proportions then apply, e.g. imbalanced mixtures).
        official_val: use the official validation partition (else ``val_fraction`` of the train partition).
        classes, class_proportions, test_proportions, proportions_seed: for a single-attribute target.
        batch_size, eval_batch_size, num_workers, persistent_workers, pin_memory, val_fraction, seed,
            with_index, drop_last: see :class:`~lightning_robust.datamodules.RobustDataModule`.

    Raises:
        ValueError: on invalid arguments.
        DatasetNotFoundError / DataIntegrityError: from ``setup`` (missing or corrupt files, named).

    Example:
        >>> dm = CelebADataModule("data", image_size=64, target="none", batch_size=64)   # for a GAN
        >>> dm = CelebADataModule("data", target="Blond_Hair", class_proportions=[0.9, 0.1])
    """

    dataset_name = "CelebA"
    layout = ("  {root}/celeba/img_align_celeba/000001.jpg ... 202599.jpg   (or {root}/celeba/img_align_celeba.zip)\n"
              "  {root}/celeba/list_attr_celeba.txt, list_eval_partition.txt[, identity_CelebA.txt]\n"
              "  (torchvision's layout; the same files directly in {root}/ also work)")
    source = ("the 'Align&Cropped Images' and annotation files of https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html "
              "(Google Drive / Baidu links there)")

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        verify: bool = True,
        checksums: str | None = None,
        image_size: int = 64,
        channels: int = 3,
        augment: bool = False,
        crop_size: int | None = 178,
        target: str = "attr",
        official_val: bool = True,
        classes: Sequence[int | str] | None = None,
        class_proportions: Sequence[float] | None = None,
        test_proportions: bool = True,
        proportions_seed: int = 0,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        if target not in ("attr", "identity", "none", *CELEBA_ATTRIBUTES):
            raise ValueError(f"target must be 'attr', 'identity', 'none' or one of CelebA's 40 attributes "
                             f"({', '.join(CELEBA_ATTRIBUTES)}), got {target!r}")
        self.target = target
        super().__init__(root=root, download=download, verify=verify, checksums=checksums, image_size=image_size,
                         channels=channels, augment=augment, classes=classes, class_proportions=class_proportions,
                         test_proportions=test_proportions, proportions_seed=proportions_seed, **loader)
        if crop_size is not None:
            check_positive_int("crop_size", crop_size)
        self.crop_size, self.official_val = crop_size, bool(official_val)
        self._annotations: dict[str, Any] | None = None
        self.attr_names: list[str] = []
        self.save_hyperparameters()

    @property
    def single_attribute(self) -> bool:
        """Whether the target is one attribute (a 2-class label)."""
        return self.target not in ("attr", "identity", "none")

    @property
    def num_classes(self) -> int:
        if self.single_attribute:
            return super().num_classes
        if self.target == "attr":
            return 40
        if self.target == "identity":
            return 10177
        return 1

    def native_class_names(self) -> list[str]:
        return [f"not {self.target}", self.target] if self.single_attribute else []

    @property
    def folder(self) -> Path:
        """The folder holding ``img_align_celeba/`` and the annotation files."""
        sub = self.root / "celeba"
        return sub if sub.is_dir() or not (self.root / "list_attr_celeba.txt").is_file() else self.root

    def _needed(self) -> list[str]:
        names = ["list_attr_celeba.txt", "list_eval_partition.txt"]
        return names + (["identity_CelebA.txt"] if self.target == "identity" else [])

    def _official_checksums(self) -> dict[Path, str]:
        return {self.folder / name: md5 for _, md5, name in _torchvision_file_list()}

    def _manifest_dirs(self) -> list[Path]:
        return manifest_dirs(self.folder, self.root)

    def _prepare_files(self, download: bool) -> None:
        folder = self.folder
        missing = [n for n in self._needed() if not (folder / n).is_file()]
        no_images = not (folder / _IMAGES).is_dir() and not (folder / _ZIP).is_file()
        if download and (missing or no_images):
            from torchvision.datasets.utils import download_file_from_google_drive

            folder = self.root / "celeba"
            for file_id, md5, name in _torchvision_file_list():
                if name in missing or (name == _ZIP and not (folder / _IMAGES).is_dir()):
                    try:
                        download_file_from_google_drive(file_id, str(folder), name, md5)
                    except (OSError, RuntimeError, ImportError) as err:
                        raise DatasetNotFoundError(
                            f"could not download CelebA's {name} from Google Drive ({type(err).__name__}: {err}); "
                            f"download it by hand from {self.source}. Expected layout:\n"
                            f"{self.layout.format(root=self.root)}") from err
                    self._verify([folder / name])
        if not (folder / _IMAGES).is_dir() and (folder / _ZIP).is_file():
            self._extract(folder / _ZIP, folder, _IMAGES)

    def _read_annotations(self) -> dict[str, Any]:
        if self._annotations is not None:
            return self._annotations
        folder = self.folder
        paths = [folder / n for n in self._needed()]
        missing = [p for p in paths if not p.is_file()]
        if not (folder / _IMAGES).is_dir():
            missing.insert(0, folder / f"{_IMAGES}/")
        if missing:
            raise self._not_found(missing)
        self._verify(paths)
        attr_names, files, attrs = read_celeba_attributes(paths[0])
        part_files, parts = read_celeba_column(paths[1], allowed=range(3))
        if part_files != files:
            diff = (i for i, (a, b) in enumerate(zip(part_files, files)) if a != b)
            row = next(diff, min(len(files), len(part_files)))
            raise DataIntegrityError(f"{paths[1]} and {paths[0]} list different images (first difference at row "
                                     f"{row + 1}; {len(part_files)} vs {len(files)} rows)")
        ann: dict[str, Any] = {"files": files, "attrs": attrs, "parts": parts}
        if self.target == "identity":
            id_files, ids = read_celeba_column(paths[2], allowed=range(1, 10178))
            if id_files != files:
                raise DataIntegrityError(f"{paths[2]} and {paths[0]} list different images")
            ann["identity"] = ids
        if self.single_attribute and self.target not in attr_names:
            raise DataIntegrityError(f"{paths[0]} has no attribute {self.target!r} (it lists {attr_names})")
        present = set(os.listdir(folder / _IMAGES))
        absent = [f for f in files if f not in present]
        if absent:
            raise self._not_found([folder / _IMAGES / f for f in absent], f"images ({len(absent)} listed in "
                                  f"{paths[1].name} but absent)")
        self.attr_names = attr_names
        self._annotations = ann
        return ann

    def _transform(self, train: bool) -> transforms.Compose:
        ops: list[Any] = []
        if self.crop_size is not None:
            ops.append(transforms.CenterCrop(self.crop_size))
        ops.append(transforms.Resize((self.image_size, self.image_size)))
        if train and self.augment:
            ops.append(transforms.RandomHorizontalFlip())
        ops.append(transforms.ToTensor())
        return transforms.Compose(ops)

    def _split(self, name: str) -> LoadedDataset:
        ann = self._read_annotations()
        rows = np.nonzero(ann["parts"] == _PARTITION[name])[0]
        if self.target == "attr":
            targets = torch.from_numpy(ann["attrs"][rows].astype(np.int64))
        elif self.target == "identity":
            targets = torch.from_numpy(ann["identity"][rows] - 1)  # the file counts from 1
        elif self.target == "none":
            targets = torch.zeros(len(rows), dtype=torch.long)
        else:
            col = self.attr_names.index(self.target)
            targets = torch.from_numpy(ann["attrs"][rows, col].astype(np.int64))
        images = self.folder / _IMAGES
        self._verify(images / ann["files"][i] for i in rows)
        paths = [str(images / ann["files"][i]) for i in rows]
        return ImageFileDataset(paths, targets, self._transform(train=False), "L" if self.channels == 1 else "RGB")

    def _load(self, split: str) -> LoadedDataset:
        return self._split(split)

    def _load_val(self) -> LoadedDataset | None:
        return self._split("val") if self.official_val else None

    def _train_view(self, ds: LoadedDataset) -> LoadedDataset:
        return ds.with_transform(self._transform(train=True)) if isinstance(ds, ImageFileDataset) else ds
