"""A dataset view that can drop samples: the generic way for a poison filter to act on any DataLoader."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["FilteredDataset"]


class FilteredDataset(Dataset):
    """Wrap a dataset so that positions can be excluded later, without rebuilding the wrapped data.

    A standalone view: excluded positions stop being yielded by loaders built afterwards.
    :class:`~lightning_robust.callbacks.DeepKNNPoisonFilter` does not use it: it acts on the exclusion set
    of ``trainer.datamodule`` (a :class:`~lightning_robust.datamodules.RobustDataModule`; wrap plain datasets
    in :class:`~lightning_robust.datamodules.DatasetDataModule`).

    Args:
        dataset: any map-style dataset.
        with_index: return ``(*item, original_index)``; ``original_index`` is the position in ``dataset``,
            stable across exclusions.

    Example:
        >>> train = FilteredDataset(TensorDataset(x, y))
        >>> trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))
    """

    def __init__(self, dataset: Dataset, with_index: bool = False) -> None:
        self.dataset = dataset
        self.with_index = with_index
        self._excluded: set[int] = set()
        self._kept: list[int] = list(range(len(dataset)))  # type: ignore[arg-type]

    @property
    def num_original(self) -> int:
        """Length of the wrapped dataset (exclusions not subtracted)."""
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def excluded_indices(self) -> list[int]:
        """Sorted original positions that are excluded."""
        return sorted(self._excluded)

    @property
    def kept_indices(self) -> list[int]:
        """Original positions still yielded, in order."""
        return list(self._kept)

    def exclude(self, indices: Sequence[int] | torch.Tensor) -> None:
        """Stop yielding the given original positions (cumulative; out-of-range positions raise)."""
        new = {int(i) for i in torch.as_tensor(indices, dtype=torch.long).flatten().tolist()}
        bad = [i for i in new if not 0 <= i < self.num_original]
        if bad:
            raise ValueError(f"indices must lie in [0, {self.num_original}), got {sorted(bad)[:5]}")
        self._excluded |= new
        self._kept = [i for i in range(self.num_original) if i not in self._excluded]

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, index: int) -> Any:
        original = self._kept[index]
        item = self.dataset[original]
        if not self.with_index:
            return item
        return (*item, original) if isinstance(item, (tuple, list)) else (item, original)
