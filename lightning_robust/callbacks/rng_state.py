"""Put the random generators' states into checkpoints, so that resuming continues the same random stream.

Lightning checkpoints hold weights, optimizer and scheduler states, loop counters and callback states,
but not the global random generators. Anything that draws from them after a resume — the random start
of PGD/FGSM in adversarial training, dropout, noise in SmoothGrad — then draws different numbers than
the uninterrupted run would have, and "resume gives the same result" fails. :class:`RNGStateCheckpoint`
saves the states of Python's ``random``, NumPy's global generator, torch's CPU generator and every CUDA
generator, for every rank (gathered to the checkpoint that rank 0 writes), and restores each rank's own
state on load.

Resuming with more ranks than the checkpoint holds (e.g. 2 saved, 4 now) cannot be exact: the new ranks
have no saved stream. Giving them rank 0's state (as a plain fallback would) makes their dropout masks,
random starts and noise identical to rank 0's, so :class:`RNGStateCheckpoint` warns and derives a
distinct, reproducible state for each new rank ``r``: it restores saved rank ``r mod n`` and then
re-seeds every generator from a SHA-256 of that rank's saved bytes and ``r``.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import pickle
import random
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from lightning_robust.utils.checkpoint import CheckpointError

__all__ = ["RNGStateCheckpoint", "capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's (CPU and CUDA) global generators, as tensors/primitives.

    Python's and NumPy's states are stored as byte tensors so the checkpoint stays weights-only loadable.
    """
    state: dict[str, Any] = {
        "python": torch.frombuffer(bytearray(pickle.dumps(random.getstate())), dtype=torch.uint8),
        "numpy": torch.frombuffer(bytearray(pickle.dumps(np.random.get_state())), dtype=torch.uint8),  # noqa: NPY002
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore a state captured by :func:`capture_rng_state`.

    The byte tensors were written by :func:`capture_rng_state` in a checkpoint the user chose to resume
    from; they hold only a tuple of ints / a NumPy state tuple, which ``pickle`` rebuilds without running
    user code (the checkpoint itself was already read with ``weights_only=True``).
    """
    random.setstate(_unpickle_state(state["python"]))
    np.random.set_state(_unpickle_state(state["numpy"]))  # noqa: NPY002  (the legacy global generator is what users seed)
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


class _StateOnlyUnpickler(pickle.Unpickler):
    """Only the builtins and the NumPy dtype needed by ``random.getstate()`` / ``np.random.get_state()``."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            for candidate in ("numpy._core.multiarray", "numpy.core.multiarray"):
                try:
                    return getattr(importlib.import_module(candidate), name)
                except (ImportError, AttributeError):
                    continue
        if (module, name) in (("numpy", "ndarray"), ("numpy", "dtype")):
            return getattr(np, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a random-generator state")


def _unpickle_state(blob: torch.Tensor) -> Any:
    return _StateOnlyUnpickler(io.BytesIO(blob.cpu().numpy().tobytes())).load()


_STATE_KEYS = ("python", "numpy", "torch")


def _checked_ranks(state_dict: Any) -> Sequence[Mapping[str, Any]]:
    """The per-rank states of a saved ``RNGStateCheckpoint`` state, or a CheckpointError naming what is wrong."""
    ranks = state_dict.get("ranks") if isinstance(state_dict, Mapping) else None
    if not isinstance(ranks, (list, tuple)) or len(ranks) == 0:
        raise CheckpointError(
            "RNGStateCheckpoint: the checkpoint's generator state holds no ranks (expected state_dict['ranks'] "
            f"to be a non-empty list of per-rank states, got {type(ranks).__name__ if ranks is not None else None}"
            f"{' of length 0' if isinstance(ranks, (list, tuple)) else ''})"
        )
    for i, rank in enumerate(ranks):
        if not isinstance(rank, Mapping) or any(k not in rank for k in _STATE_KEYS):
            raise CheckpointError(
                f"RNGStateCheckpoint: state_dict['ranks'][{i}] is not a generator state (expected a mapping with "
                f"keys {list(_STATE_KEYS)}, got {type(rank).__name__})"
            )
    return ranks


def derive_rng_state(state: Mapping[str, Any], rank: int) -> None:
    """Restore ``state``, then re-seed every generator from a hash of it and ``rank``.

    Used for ranks a checkpoint has no state for: each gets a stream that differs from every other
    rank's (the seed depends on ``rank``) and is the same every time this checkpoint is resumed with
    this world size (the seed depends only on saved bytes and ``rank``).
    """
    restore_rng_state(dict(state))
    digest = hashlib.sha256()
    for key in _STATE_KEYS:
        digest.update(state[key].cpu().numpy().tobytes())
    digest.update(f"rank={rank}".encode())
    seed = int.from_bytes(digest.digest()[:8], "little")
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (the legacy global generator is what users seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


class RNGStateCheckpoint(pl.Callback):
    """Save every rank's random-generator states in checkpoints and restore them on resume.

    Example:
        >>> trainer = pl.Trainer(callbacks=[RNGStateCheckpoint(), ModelCheckpoint(save_last=True)])
        >>> trainer.fit(model, ckpt_path="last")   # continues the same random stream on every rank

    The ``lightning-robust`` CLI installs it by default.
    """

    def __init__(self) -> None:
        super().__init__()
        self._trainer: pl.Trainer | None = None

    def state_dict(self) -> dict[str, Any]:
        # Called on every rank while the checkpoint is assembled; rank 0's copy is written, so gather.
        mine = capture_rng_state()
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        if world == 1:
            return {"ranks": [mine]}
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        return {"ranks": gathered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restore at once: Lightning loads callback states just before the fit loop starts, and the first
        # thing the loop does is create the training iterator, which draws from the global RNG exactly as
        # the uninterrupted run did at the start of that epoch (the sanity check runs under isolate_rng).
        ranks = _checked_ranks(state_dict)
        trainer = getattr(self, "_trainer", None)
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        if world != len(ranks) and rank == 0:
            more = world > len(ranks)
            warnings.warn(
                f"RNGStateCheckpoint: the checkpoint holds generator states of {len(ranks)} rank(s), this run has "
                f"{world}; resuming is not exactly the uninterrupted run. "
                + (f"Ranks {len(ranks)}..{world - 1} get distinct states derived from the saved ones."
                   if more else f"The states of ranks {world}..{len(ranks) - 1} are dropped."),
                stacklevel=2,
            )
        if rank < len(ranks):
            restore_rng_state(dict(ranks[rank]))
        else:
            derive_rng_state(ranks[rank % len(ranks)], rank)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
