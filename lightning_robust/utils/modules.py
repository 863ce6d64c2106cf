"""Module helpers shared by every package: a train/eval mode guard and the dotted-name layer lookup.

Both are pure PyTorch (no Lightning), so ``attacks``, ``certify``, ``ot`` and the Lightning layers use the
same implementation.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator

from torch import nn

__all__ = ["MODEL_MODES", "model_mode", "resolve_layer"]

MODEL_MODES = ("eval", "train", "keep")


@contextlib.contextmanager
def model_mode(model: nn.Module | Iterable[nn.Module | None], mode: str) -> Iterator[None]:
    """Put ``model`` (or each of several modules) in ``mode`` and restore every submodule's own flag on exit.

    ``model.train(flag)`` on exit would overwrite submodules that were deliberately in another mode (a
    frozen teacher or a BatchNorm kept in eval inside a training net); this guard records
    ``m.training`` for every ``m in model.modules()`` and puts each one back, also when the body raises.

    Args:
        model: a module, or an iterable of modules (``None`` entries are skipped).
        mode: ``"eval"``, ``"train"`` or ``"keep"`` (leave the flags as they are).

    Raises:
        ValueError: if ``mode`` is not one of :data:`MODEL_MODES`.
        TypeError: if ``model`` is neither a module nor an iterable of modules.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> with model_mode(net, "eval"):
        ...     assert not net[1].training
        >>> net[1].training
        True
    """
    if mode not in MODEL_MODES:
        raise ValueError(f"mode must be one of {MODEL_MODES}, got {mode!r}")
    if isinstance(model, nn.Module):
        mods = [model]
    else:
        try:
            mods = [m for m in model if m is not None]
        except TypeError:
            raise TypeError(f"model must be an nn.Module or an iterable of them, got {type(model).__name__}") from None
        for m in mods:
            if not isinstance(m, nn.Module):
                raise TypeError(f"model must be an nn.Module or an iterable of them, got an item of type "
                                f"{type(m).__name__}")
    flags = [(sub, sub.training) for m in mods for sub in m.modules()]
    try:
        if mode != "keep":
            for m in mods:
                m.train(mode == "train")
        yield
    finally:
        for sub, flag in flags:
            sub.training = flag


def resolve_layer(module: nn.Module, layer: str) -> nn.Module:
    """Return ``module.get_submodule(layer)`` or raise a ``ValueError`` that lists valid names.

    Args:
        module: the root module.
        layer: dotted path such as ``"classifier.3"`` or ``"net.layers.2"``; ``""`` is the module itself.

    Raises:
        TypeError: if ``layer`` is not a string.
        ValueError: if no submodule has that name; the message gives the closest matches and a few names.
    """
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a dotted module name (str), got {type(layer).__name__}")
    try:
        return module.get_submodule(layer)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n]
        close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
        shown = close or names[:8]
        more = "" if len(names) <= len(shown) else f" ... ({len(names)} in all)"
        raise ValueError(
            f"layer {layer!r} does not exist in {type(module).__name__}; "
            f"{'closest names' if close else 'valid names include'}: {', '.join(map(repr, shown))}{more}"
        ) from None
