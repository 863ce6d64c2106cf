"""Epoch means of per-step training values, logged once per epoch instead of once per step (issue 25, item 4).

``LightningModule.log(..., on_step=False, on_epoch=True)`` accumulates a value per call, but each call
costs Lightning ~0.3-0.5 ms of Python bookkeeping (metadata checks and moving its result state, whatever the
value's size): a module logging a dozen epoch-only values per step (NW domain adaptation's ``π_k``, the
entropic GAN's dual parts) spent ~10% of a CPU fit there. :class:`EpochMeans` keeps the same batch-weighted
sums with one tensor addition per value and step, and logs their means at the end of the epoch through
the ordinary ``log`` call: the logged keys and values are those the per-step calls gave (Lightning's epoch
value of a mean-reduced log is ``Σ_steps n_s v_s / Σ_steps n_s``, ``n_s`` the step's batch size).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["EpochMeans"]


class EpochMeans:
    """Batch-weighted running sums of per-step values, logged as means by :meth:`log` (then reset).

    Under DDP the logged value is ``sync_dist``-averaged over ranks: the global batch-weighted mean whenever
    every rank takes the same number of equal-sized batches (a ``DistributedSampler``'s shards), as
    Lightning's own epoch reduction gives. Values of a key added on some steps only (e.g. the generator's
    logs of a GAN with ``n_critic > 1``) average over those steps. The sums are not checkpointed: after a
    mid-epoch resume the epoch's values average the steps since the resume.

    Example:
        >>> self.epoch_means.add({"transport": t, "reg": lam}, batch_size=n)   # in training_step
        >>> self.epoch_means.log(self, prefix="train/")                        # in on_train_epoch_end
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor | float] = {}
        self._weights: dict[str, float] = {}

    def add(self, values: Mapping[str, torch.Tensor | float], batch_size: int) -> None:
        """Add ``batch_size * value`` for every ``name -> value`` (scalars; tensors are detached and stay on
        their device, Python numbers stay Python numbers: no host-device copy per step)."""
        for name, value in values.items():
            term = value.detach().float() * batch_size if torch.is_tensor(value) else float(value) * batch_size
            prev = self._sums.get(name)
            self._sums[name] = term if prev is None else prev + term
            self._weights[name] = self._weights.get(name, 0.0) + batch_size

    def means(self) -> dict[str, torch.Tensor | float]:
        """The current means, ``name -> Σ n v / Σ n``."""
        return {name: s / self._weights[name] for name, s in self._sums.items()}

    def log(self, module: Any, prefix: str = "") -> None:
        """``module.log(prefix + name, mean, on_epoch=True, sync_dist=True)`` for every value, then reset."""
        for name, mean in self.means().items():
            module.log(f"{prefix}{name}", mean, on_step=False, on_epoch=True, sync_dist=True)
        self.reset()

    def reset(self) -> None:
        self._sums.clear()
        self._weights.clear()
