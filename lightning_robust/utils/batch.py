"""Batch adapters: read ``(x, y)``, ``(x, y, index)`` or dict batches the same way."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["Batch", "split_batch"]


class Batch(NamedTuple):
    """A supervised batch: inputs, targets and (optionally) dataset indices.

    (The field is ``indices``, not ``index``, which would shadow ``tuple.index``.)
    """

    x: torch.Tensor
    y: torch.Tensor
    indices: torch.Tensor | None = None


def split_batch(batch: Any) -> Batch:
    """Return ``Batch(x, y, indices)`` from the common batch layouts.

    Accepts ``(x, y)``, ``(x, y, index)`` (what our DataModules yield with ``with_index=True``) and
    mappings with keys ``x``/``input``/``image``/``input_ids``, ``y``/``label``/``target`` and ``index``.

    Raises:
        ValueError: for any other layout, naming what was received.
    """
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in ("x", "input", "image", "images", "input_ids") if k in batch), None)
        y = next((batch[k] for k in ("y", "label", "labels", "target") if k in batch), None)
        if x is None or y is None:
            raise ValueError(f"a dict batch needs an input key and a label key, got keys {sorted(batch)}")
        return Batch(x, y, batch.get("index"))
    if isinstance(batch, Sequence) and len(batch) in (2, 3):
        return Batch(batch[0], batch[1], batch[2] if len(batch) == 3 else None)
    raise ValueError(
        f"batch must be (x, y), (x, y, index) or a dict, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, Sequence) else "")
    )
