"""Shared machinery of the on-disk vision DataModules (CIFAR-10, MNIST, CelebA, VisDA-2017, MNIST-M)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import ClassVar, Unpack

from torch.utils.data import Dataset, Subset

from lightning_robust.datamodules.base import LoaderOptions, RobustDataModule
from lightning_robust.datamodules.image_datasets import (
    ImageFileDataset,
    TensorImageDataset,
    proportional_subsample,
    select_classes,
)
from lightning_robust.datamodules.integrity import (
    MANIFEST_NAME,
    ChecksumTable,
    DatasetNotFoundError,
    extract_archive_once,
    normalize_path,
    verify_checksums,
)
from lightning_robust.utils.validation import check_choice, check_positive_int, check_probability_vector, check_seed

__all__ = ["VisionDataModule"]

LoadedDataset = TensorImageDataset | ImageFileDataset


class VisionDataModule(RobustDataModule):
    """Base of the DataModules that read a real data set from disk.

    What it adds to :class:`RobustDataModule`:

    * ``prepare_data`` / ``setup`` split: downloading and extracting happen in :meth:`prepare_data`, which
      Lightning runs once per node (local rank 0) while the other ranks wait; :meth:`setup` only reads, on
      every rank. Archives are extracted atomically (temporary folder, then rename), so even processes
      started outside Lightning never see a half-extracted folder. Calling :meth:`setup` without a Trainer
      runs :meth:`prepare_data` first, so scripts need no extra call.
    * integrity: every file is checksummed before it is read (official MD5s, or a manifest; see
      :mod:`lightning_robust.datamodules.integrity`), readers check structure, and every problem raises one
      error naming the file or the expected layout.
    * the options the methods need: ``image_size``, ``channels`` (1 or 3), paper-standard training
      augmentation (``augment``), class subsets (``classes``, by index or name, relabelled in the given
      order) and imbalanced mixtures (``class_proportions``: the largest deterministic subsample with those
      class frequencies, :func:`proportional_subsample`). Validation and test sets never get augmentation.
    * stage-aware loading: ``setup("test")`` reads only the test files, ``setup("fit")`` only the training
      files.

    Subclasses implement :meth:`_prepare_files`, :meth:`_load` and describe the data set's layout.
    """

    dataset_name: ClassVar[str] = "data set"
    #: Human-readable expected folder layout, shown when files are missing.
    layout: ClassVar[str] = ""
    #: Where to get the files, shown when files are missing.
    source: ClassVar[str] = ""
    download_supported: ClassVar[bool] = True

    def __init__(
        self,
        *,
        root: str,
        download: bool,
        verify: bool,
        checksums: str | None,
        image_size: int,
        channels: int,
        augment: bool,
        classes: Sequence[int | str] | None,
        class_proportions: Sequence[float] | None,
        test_proportions: bool,
        proportions_seed: int,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        check_seed("proportions_seed", proportions_seed)
        super().__init__(**loader)
        if not isinstance(root, (str, Path)) or not str(root):
            raise ValueError(f"root must be a folder path, got {root!r}")
        if download and not self.download_supported:
            raise ValueError(f"download=True is not available for {self.dataset_name}: {self.source}")
        check_positive_int("image_size", image_size, minimum=4)
        check_choice("channels", channels, (1, 3))
        self.root = Path(root).expanduser()
        self.download = bool(download)
        self.verify = bool(verify)
        self.checksums = str(checksums) if checksums is not None else None
        self.image_size, self.channels, self.augment = image_size, channels, bool(augment)
        self.test_proportions, self.proportions_seed = bool(test_proportions), proportions_seed
        self.classes = self._resolve_classes(classes)
        n_kept = len(self.classes) if self.classes is not None else len(self.native_class_names())
        self.class_proportions: list[float] | None = None
        if class_proportions is not None:
            if n_kept == 0:
                raise ValueError(f"class_proportions needs class targets; {self.dataset_name} has none "
                                 "with these arguments")
            p = check_probability_vector("class_proportions", class_proportions)
            if p.numel() != n_kept:
                raise ValueError(f"class_proportions must have one entry per kept class ({n_kept}), got {p.numel()}")
            self.class_proportions = p.tolist()
        self._prepared = False
        self._table: ChecksumTable | None = None
        self._checked: set[Path] = set()

    # ---- description ------------------------------------------------------------------------------
    def native_class_names(self) -> list[str]:
        """Names of the data set's classes in label order (empty for non-class targets)."""
        return []

    @property
    def class_names(self) -> list[str]:
        """Names of the classes the DataModule yields, in label order."""
        names = self.native_class_names()
        return [names[c] for c in self.classes] if self.classes is not None else names

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else len(self.native_class_names())

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(channels, image_size, image_size)`` of the yielded images."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def checked_files(self) -> list[Path]:
        """Files whose checksum was verified in this process so far."""
        return sorted(self._checked)

    def _resolve_classes(self, classes: Sequence[int | str] | None) -> list[int] | None:
        if classes is None:
            return None
        if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
            raise ValueError(f"classes must be a list of class indices or names, got {classes!r}")
        names = self.native_class_names()
        n = len(names)
        if n == 0:
            raise ValueError(f"classes needs class targets; {self.dataset_name} has none with these arguments")
        out: list[int] = []
        for c in classes:
            if isinstance(c, str) and c in names:
                out.append(names.index(c))
            elif isinstance(c, int) and not isinstance(c, bool) and 0 <= c < n:
                out.append(c)
            else:
                raise ValueError(f"classes must be distinct indices in 0..{n - 1} or names among {names}, "
                                 f"got {list(classes)!r}")
        if not out or len(set(out)) != len(out):
            raise ValueError(f"classes must be a non-empty list of distinct classes, got {list(classes)!r}")
        return out

    # ---- to implement -----------------------------------------------------------------------------
    def _prepare_files(self, download: bool) -> None:
        """Make the files available (extract a local archive, or download if allowed); never raises for
        absent files (``setup`` reports those, split by split)."""
        raise NotImplementedError

    def _load(self, split: str) -> LoadedDataset | None:
        """Verify and read ``split`` (``"train"`` or ``"test"``) without augmentation (``None``: no such split)."""
        raise NotImplementedError

    def _load_val(self) -> LoadedDataset | None:
        """An official validation set, or ``None`` to split ``val_fraction`` off the training set."""
        return None

    def _train_view(self, ds: LoadedDataset) -> LoadedDataset:
        """The training view of ``ds`` (augmentation on)."""
        return ds

    def _official_checksums(self) -> dict[Path, str]:
        """``{path: md5}`` of the published release's files (empty when the publisher gives none)."""
        return {}

    def _manifest_dirs(self) -> list[Path]:
        """Folders in which an ``MD5SUMS`` manifest is picked up automatically."""
        return [self.root]

    # ---- helpers for subclasses -------------------------------------------------------------------
    def _not_found(self, missing: Iterable[Path], what: str = "") -> DatasetNotFoundError:
        missing = list(missing)
        shown = ", ".join(str(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        how = "download=True, or " if self.download_supported else ""
        return DatasetNotFoundError(
            f"{self.dataset_name} {what or 'files'} not found under {self.root}: missing {shown}.\n"
            f"Expected layout:\n{self.layout.format(root=self.root)}\n"
            f"Get it with {how}{self.source}")

    def _verify(self, paths: Iterable[Path]) -> None:
        """Checksum ``paths`` (once per process each) before they are read."""
        if self._table is None:
            self._table = ChecksumTable(self._official_checksums(), self.checksums, self._manifest_dirs(),
                                        enabled=self.verify)
        if self._table.is_empty():
            return
        todo = [p for p in map(normalize_path, paths) if p not in self._checked]
        fetch = (f"delete it and run again with download=True, or fetch it again from {self.source}"
                 if self.download_supported else f"fetch it again: {self.source}")
        # A re-packed or re-encoded copy is a legitimate reason for other checksums: name both ways out.
        hint = (f"If it is damaged, {fetch}. If it is a deliberate copy of your own (re-packed, converted), "
                f"write a checksum manifest for it with lightning_robust.datamodules.write_checksum_manifest("
                f"'{self.root}') and pass checksums='{self.root}/{MANIFEST_NAME}' (an {MANIFEST_NAME} file in the "
                "data set's folder is picked up by itself), or skip the checks with verify=False.")
        self._checked.update(verify_checksums(todo, self._table, hint))

    def _extract(self, archive: Path, dest_parent: Path, top: str) -> Path:
        """Verify ``archive`` and extract its folder ``top`` into ``dest_parent`` (atomically)."""
        self._verify([archive])
        return extract_archive_once(archive, dest_parent, top)

    def _download(self, url: str, folder: Path, filename: str) -> Path:
        """Download ``url`` to ``folder/filename`` (torchvision's downloader) and verify its checksum.

        Raises:
            DatasetNotFoundError: if the download fails (naming the URL and the manual alternative).
            DataIntegrityError: if the downloaded file does not match its expected checksum.
        """
        from torchvision.datasets.utils import download_url

        try:
            download_url(url, str(folder), filename, None)
        except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError
            raise DatasetNotFoundError(f"could not download {url} to {folder / filename} ({type(err).__name__}: "
                                       f"{err}). Place the file there yourself; expected layout:\n"
                                       f"{self.layout.format(root=self.root)}") from err
        path = folder / filename
        self._verify([path])
        return path

    # ---- Lightning hooks --------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download / extract what is missing (Lightning calls this once per node, before ``setup``)."""
        self._prepare_files(self.download)
        self._prepared = True

    def _subsample(self, ds: LoadedDataset, proportions: bool = True) -> LoadedDataset:
        if self.classes is not None:
            keep, labels = select_classes(ds.targets, self.classes)
            ds = ds.select(keep, labels)
        if proportions and self.class_proportions is not None:
            ds = ds.select(proportional_subsample(ds.targets, self.class_proportions, self.proportions_seed))
        return ds

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if not self._prepared and (trainer is None or trainer.local_rank == 0):
            # Without a Trainer nobody else calls prepare_data; under one, local rank 0 already has.
            self.prepare_data()
        if stage in (None, "fit", "validate") and self.train_dataset is None:
            loaded = self._load("train")
            if loaded is None:
                raise RuntimeError(f"{type(self).__name__} has no training split")
            full = self._subsample(loaded)
            val = self._load_val()
            if val is None:
                train_idx, val_idx = self.split_indices(len(full))
                self.val_dataset = Subset(full, val_idx) if val_idx else None
            else:
                train_idx = list(range(len(full)))
                self.val_dataset = self._subsample(val)
            self.train_dataset = Subset(self._train_view(full), train_idx)
        if stage in (None, "test", "predict") and self.test_dataset is None:
            test = self._load("test")
            self.test_dataset = self._subsample(test, proportions=self.test_proportions) if test is not None else None

    def _require(self, ds: Dataset | None, split: str) -> Dataset:
        if ds is None:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[split])
            ds = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}[split]
            if ds is None:
                why = f"val_fraction={self.val_fraction}" if split == "val" else "its arguments give no test set"
                raise RuntimeError(f"{type(self).__name__} has no {split} split ({why})")
        return ds


def official_table(folder: Path, entries: Iterable[tuple[str, str]]) -> dict[Path, str]:
    """``{folder / name: md5}`` for ``(name, md5)`` pairs."""
    return {folder / name: md5 for name, md5 in entries}


def manifest_dirs(*dirs: Path) -> list[Path]:
    """Distinct folders to search for an ``MD5SUMS`` manifest."""
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out

