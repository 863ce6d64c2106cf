"""Safe checkpoint loading: ``torch.load(weights_only=True)`` only, with clear errors.

A pickle can run arbitrary code when loaded; ``weights_only=True`` restricts unpickling to tensors and
primitive containers. Every checkpoint read by this library goes through :func:`safe_load`.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "extract_state_dict", "load_module", "safe_load"]

PathLike = str | os.PathLike


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, not weights-only, or does not fit the target module."""


def safe_load(path: PathLike | io.BytesIO, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with ``weights_only=True``.

    Raises:
        CheckpointError: if the file is missing, or holds objects other than tensors and primitives
            (a full pickled module, or a booby-trapped pickle: its payload never runs).
    """
    name = path if isinstance(path, (str, os.PathLike)) else "<buffer>"
    if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
        raise CheckpointError(f"checkpoint file {str(name)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {str(name)!r} is not a weights-only file (it holds pickled objects beyond tensors and "
            f"primitive containers, which lightning_robust refuses to unpickle): {str(err).splitlines()[0]}"
        ) from None
    except Exception as err:  # corrupt bytes surface as many exception types; all mean "unreadable"
        raise CheckpointError(
            f"checkpoint {str(name)!r} could not be read ({type(err).__name__}: {str(err)[:200]})"
        ) from None


def extract_state_dict(obj: Any, template: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Return the module state dict inside ``obj`` (a plain state dict or a Lightning checkpoint).

    When ``template`` is given and the keys carry a prefix (a LightningModule stores its net as
    ``net.*``, ``student.*``, ...), the prefix under which the template's keys are found is stripped.
    """
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError("the checkpoint holds no state dict (a mapping from names to tensors)")
    state = dict(obj)
    if template is None:
        return state
    wanted = set(template.state_dict())
    if wanted <= set(state):
        return {k: state[k] for k in wanted}
    # Find the prefix p with {p + k for k in wanted} inside the checkpoint's keys.
    some = next(iter(wanted)) if wanted else ""
    for key in state:
        if key.endswith(some):
            prefix = key[: len(key) - len(some)]
            if all(prefix + k in state for k in wanted):
                return {k: state[prefix + k] for k in wanted}
    missing = sorted(wanted - set(state))[:5]
    raise CheckpointError(
        f"the checkpoint does not contain the weights of {type(template).__name__} "
        f"(e.g. missing {missing}; checkpoint keys start with {sorted(state)[:3]})"
    )


def load_module(
    source: nn.Module | PathLike,
    into: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
) -> nn.Module:
    """Return a module: ``source`` itself, or ``into`` with weights loaded (weights-only) from ``source``.

    Args:
        source: an ``nn.Module`` (returned unchanged) or the path of a state dict / Lightning checkpoint.
        into: the architecture to load a path into; required when ``source`` is a path, since a
            weights-only file stores no code.
        map_location: device for the loaded tensors.
        strict: require shapes and names to match exactly.

    Raises:
        CheckpointError: path missing, not weights-only, or weights that do not fit ``into``.
        ValueError: a path without ``into``.

    Example:
        >>> teacher = load_module("teacher.ckpt", into=WideResNet(depth=34, widen_factor=10))
    """
    if isinstance(source, nn.Module):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be an nn.Module or a checkpoint path, got {type(source).__name__}")
    if into is None:
        raise ValueError(
            f"loading {str(source)!r} needs `into`, the architecture to load the weights into "
            "(weights-only checkpoints store no code)"
        )
    state = extract_state_dict(safe_load(source, map_location), template=into)
    try:
        into.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {str(source)!r} do not fit {type(into).__name__}: {err}") from None
    return into
