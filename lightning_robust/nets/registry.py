"""Build a net from a short name, for scripts, the demo and benchmarks.

LightningCLI users select nets with ``class_path`` instead; this registry is the programmatic shortcut
and the place where an unknown name gets one clear error listing the valid ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["available_nets", "build_net", "register_net"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_net(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register ``factory`` under ``name`` (used by subpackages that add nets, e.g. DCGAN, text)."""
    if name in _REGISTRY and _REGISTRY[name] is not factory:
        raise ValueError(f"a net named {name!r} is already registered")
    _REGISTRY[name] = factory


def available_nets() -> list[str]:
    """Sorted names accepted by :func:`build_net`."""
    return sorted(_REGISTRY)


def build_net(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the net registered as ``name`` with ``kwargs``.

    Raises:
        ValueError: if ``name`` is unknown; the message lists the valid names and the closest match.

    Example:
        >>> net = build_net("small_cnn", in_channels=1, num_classes=10, input_size=8)
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown net name {name!r}{hint}; valid names: {', '.join(available_nets())}")
    return _REGISTRY[name](**kwargs)
