"""The shared base of every DataModule: deterministic splits, loaders, ``with_index``, sample exclusion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, TypedDict, Unpack

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from lightning_robust.utils.checkpoint import WeightsOnlyLoadFromCheckpoint
from lightning_robust.utils.validation import check_fraction, check_non_negative, check_positive_int, check_seed

__all__ = ["LOADER_DEFAULTS", "EpochShuffleSampler", "IndexedDataset", "LoaderOptions", "OwnGeneratorLoader",
           "RobustDataModule"]


class LoaderOptions(TypedDict, total=False):
    """The loader and split settings every :class:`RobustDataModule` takes as keyword arguments.

    Args:
        batch_size: training batch size (per process).
        eval_batch_size: batch size for val/test/predict (defaults to ``batch_size``).
        num_workers: DataLoader worker processes.
        persistent_workers: keep workers alive between epochs (only when ``num_workers > 0``).
        pin_memory: pin host memory (useful on GPU).
        val_fraction: fraction of the training set held out for validation, in [0, 1).
        seed: seed of the train/val split and of the training-data order.
        with_index: yield ``(x, y, index)`` batches from the train and val loaders.
        drop_last: drop the last incomplete training batch.
    """

    batch_size: int
    eval_batch_size: int | None
    num_workers: int
    persistent_workers: bool
    pin_memory: bool
    val_fraction: float
    seed: int
    with_index: bool
    drop_last: bool


#: Defaults of :class:`LoaderOptions` (a subclass changes some with ``loader_defaults``).
LOADER_DEFAULTS: LoaderOptions = {"batch_size": 128, "eval_batch_size": None, "num_workers": 0,
                                  "persistent_workers": True, "pin_memory": False, "val_fraction": 0.1, "seed": 0,
                                  "with_index": False, "drop_last": False}


class OwnGeneratorLoader(DataLoader):
    """A DataLoader that draws its workers' base seed from its own generator, never from the global RNG.

    A plain DataLoader draws from the global RNG every time an iterator is created (each epoch, and each
    time Lightning rebuilds the loaders, e.g. after the poison filter removes samples). A resumed run cannot
    replay those draws in the same order, so the global RNG (dropout, attack random starts) would drift from
    the uninterrupted run even with :class:`~lightning_robust.callbacks.RNGStateCheckpoint`. The generator
    is created on first use and left out of pickles (``ddp_spawn`` pickles DataModules, and pickled
    generators do not survive shared-memory transfer).
    """

    def __init__(self, seed: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._generator_seed = seed

    def __iter__(self) -> Any:
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self._generator_seed)
        return super().__iter__()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["generator"] = None
        return state


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``torch.Generator().manual_seed(seed + epoch)``.

    ``shuffle=True`` draws its order from the global RNG, which checkpoints do not hold, so a resumed run
    would see other batches than an uninterrupted one. This sampler's order depends only on
    ``(seed, epoch)``; Lightning calls :meth:`set_epoch` before every epoch (also after a resume), and
    under DDP wraps it so that every rank shards the same order.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # type: ignore[no-untyped-def]
        g = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


class IndexedDataset(Dataset):
    """Wrap a ``(x, y)`` dataset so that item ``i`` is ``(x, y, i)``.

    The poison filter (and anything else that reasons about individual training samples) needs to know
    which dataset element each row of a batch is, also under DDP where samplers shuffle and shard.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        x, y = self.dataset[index][:2]
        return x, y, index

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Any, Any, int]]:
        # DataLoader fetches a whole batch through __getitems__ when the dataset has one; passing it on
        # keeps batch-vectorised datasets (e.g. CIFAR-10's crop+flip) fast with ``with_index=True``.
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(list(indices)) if callable(getitems) else [self.dataset[i] for i in indices]
        return [(item[0], item[1], int(i)) for item, i in zip(items, indices)]


class RobustDataModule(WeightsOnlyLoadFromCheckpoint, pl.LightningDataModule):  # type: ignore[misc]  # weights-only override
    """Base DataModule: a training set split into train/val by seed, an optional test set, and loaders.

    Subclasses implement :meth:`build_datasets` (return the full training set and the test set, or
    ``None``) and may override :meth:`prepare_data` to download. The base then

    * splits the training set into train / val with ``torch.randperm`` seeded by ``seed`` (identical on
      every rank, so DDP processes agree on the split without communication);
    * wraps datasets in :class:`IndexedDataset` when ``with_index`` is set (batches are ``(x, y, index)``,
      ``index`` counting positions in :attr:`train_dataset`);
    * lets callbacks drop training samples by index (:meth:`exclude_train_indices`), e.g. the Deep k-NN
      poison filter; the next train dataloader no longer yields them;
    * shuffles training data with :class:`EpochShuffleSampler` (order fixed by ``seed`` and the epoch, so
      resuming from a checkpoint replays exactly the batches an uninterrupted run would see);
    * leaves distributed sharding to Lightning (``use_distributed_sampler``).

    The nine loader settings below are keyword-only and typed once, in :class:`LoaderOptions`; subclasses
    take them as ``**loader: Unpack[LoaderOptions]`` (LightningCLI and mypy see each one by name) and change
    a default through :attr:`loader_defaults`.

    Args:
        batch_size: training batch size (per process).
        eval_batch_size: batch size for val/test/predict (defaults to ``batch_size``).
        num_workers: DataLoader worker processes.
        persistent_workers: keep workers alive between epochs (only when ``num_workers > 0``).
        pin_memory: pin host memory (useful on GPU).
        val_fraction: fraction of the training set held out for validation, in [0, 1).
        seed: seed of the train/val split and of the training-data order.
        with_index: yield ``(x, y, index)`` batches from the train and val loaders.
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: on a non-positive batch size, negative workers, or a fraction outside [0, 1).
    """

    #: Per-class defaults of the loader settings that differ from :data:`LOADER_DEFAULTS` (e.g. a smaller
    #: ``batch_size`` for text); a subclass overrides this instead of repeating the nine arguments.
    loader_defaults: ClassVar[LoaderOptions] = {}

    def __init__(self, **loader: Unpack[LoaderOptions]) -> None:
        unknown = sorted(set(loader) - set(LOADER_DEFAULTS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {unknown}; the loader "
                            f"settings are {sorted(LOADER_DEFAULTS)}")
        opts: dict[str, Any] = {**LOADER_DEFAULTS, **type(self).loader_defaults, **loader}
        batch_size, eval_batch_size = opts["batch_size"], opts["eval_batch_size"]
        num_workers, seed = opts["num_workers"], opts["seed"]
        check_seed("seed", seed)
        super().__init__()
        check_positive_int("batch_size", batch_size)
        if eval_batch_size is not None:
            check_positive_int("eval_batch_size", eval_batch_size)
        check_non_negative("num_workers", num_workers)
        if not isinstance(num_workers, int):
            raise ValueError(f"num_workers must be an integer, got {num_workers!r}")
        check_fraction("val_fraction", opts["val_fraction"])
        self.batch_size: int = batch_size
        self.eval_batch_size: int = eval_batch_size or batch_size
        self.num_workers: int = num_workers
        self.persistent_workers: bool = bool(opts["persistent_workers"]) and num_workers > 0
        self.pin_memory: bool = opts["pin_memory"]
        self.val_fraction: float = opts["val_fraction"]
        self.seed: int = seed
        self.with_index: bool = opts["with_index"]
        self.drop_last: bool = opts["drop_last"]
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None
        self._excluded: set[int] = set()

    @property
    def loader_options(self) -> LoaderOptions:
        """The loader settings in effect, e.g. to build a wrapping DataModule with the same loaders."""
        return {"batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size,
                "num_workers": self.num_workers, "persistent_workers": self.persistent_workers,
                "pin_memory": self.pin_memory, "val_fraction": self.val_fraction, "seed": self.seed,
                "with_index": self.with_index, "drop_last": self.drop_last}

    # ---- to implement -------------------------------------------------------------------------------
    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        """Return ``(full_training_set, test_set_or_None)``; items are ``(x, y)`` pairs."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Number of classes (subclasses override)."""
        raise NotImplementedError

    # ---- splitting ----------------------------------------------------------------------------------
    def split_indices(self, n: int) -> tuple[list[int], list[int]]:
        """Deterministic ``(train_indices, val_indices)`` of a training set of size ``n``."""
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        n_val = round(self.val_fraction * n)
        return sorted(perm[n_val:]), sorted(perm[:n_val])

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        full, test = self.build_datasets()
        train_idx, val_idx = self.split_indices(len(full))  # type: ignore[arg-type]
        self.train_dataset = Subset(full, train_idx)
        self.val_dataset = Subset(full, val_idx) if val_idx else None
        self.test_dataset = test

    # ---- exclusion (poison filtering) ---------------------------------------------------------------
    def exclude_train_indices(self, indices: Sequence[int] | torch.Tensor) -> None:
        """Stop yielding the given :attr:`train_dataset` positions from the next train dataloader on."""
        self._excluded.update(int(i) for i in torch.as_tensor(indices).flatten().tolist())

    @property
    def excluded_train_indices(self) -> list[int]:
        """Sorted positions excluded with :meth:`exclude_train_indices`."""
        return sorted(self._excluded)

    def state_dict(self) -> dict[str, Any]:
        # Exclusions are part of the training state: a resumed run must train on the same kept set.
        return {"excluded_train_indices": self.excluded_train_indices}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._excluded = set(int(i) for i in state_dict.get("excluded_train_indices", []))

    # ---- loaders ------------------------------------------------------------------------------------
    def _wrap(self, ds: Dataset) -> Dataset:
        return IndexedDataset(ds) if self.with_index else ds

    def _loader(self, ds: Dataset, shuffle: bool, batch_size: int, drop_last: bool = False) -> DataLoader:
        sampler = EpochShuffleSampler(len(ds), self.seed) if shuffle else None  # type: ignore[arg-type]
        return OwnGeneratorLoader(
            self.seed,
            ds,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            drop_last=drop_last,
        )

    def _require(self, ds: Dataset | None, split: str) -> Dataset:
        if ds is None:
            if self.train_dataset is None:
                self.setup()
                ds = {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}[split]
            if ds is None:
                raise RuntimeError(f"{type(self).__name__} has no {split} split "
                                   f"(val_fraction={self.val_fraction})")
        return ds

    def train_dataloader(self) -> DataLoader:
        ds = self._wrap(self._require(self.train_dataset, "train"))
        if self._excluded:
            keep = [i for i in range(len(ds)) if i not in self._excluded]  # type: ignore[arg-type]
            ds = Subset(ds, keep)
        return self._loader(ds, shuffle=True, batch_size=self.batch_size, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._wrap(self._require(self.val_dataset, "val")), False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.test_dataset, "test"), False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
