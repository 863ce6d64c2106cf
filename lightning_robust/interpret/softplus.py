"""A softplus stand-in for the ReLUs of a network, for attacks and penalties that need input curvature."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.utils.validation import check_positive

__all__ = ["softplus_surrogate"]


class _SoftplusHook:
    """Forward hook replacing a ReLU module's output by ``softplus(input, beta)`` (picklable, no closure)."""

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return F.softplus(inputs[0], beta=self.beta)


@contextlib.contextmanager
def softplus_surrogate(model: nn.Module, beta: float = 10.0) -> Iterator[nn.Module]:
    """Within the block, every ``nn.ReLU`` module of ``model`` computes ``softplus(x, beta)`` instead.

    A ReLU network is piecewise linear, so the input gradient of its saliency map (the input Hessian of a
    logit) is zero almost everywhere and gradient-based attacks on interpretations stall. Levine et al.
    (arXiv 1905.12105) attack a softplus twin of the network instead; this context manager gives that twin
    with the *same* weights, through forward hooks that are always removed on exit (``inplace`` flags are
    switched off meanwhile and restored). ``beta -> inf`` recovers the ReLU. Functional ``F.relu`` calls
    inside ``forward`` are not affected; all nets of :mod:`lightning_robust.nets` use ``nn.ReLU`` modules.

    Args:
        model: any ``nn.Module``.
        beta: softplus sharpness (> 0).

    Raises:
        ValueError: if ``beta`` is not positive.

    Example:
        >>> with softplus_surrogate(net, beta=10.0):
        ...     hvp = torch.autograd.grad(...)   # non-zero input curvature
    """
    check_positive("beta", beta)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    flags = [m.inplace for m in relus]
    handles = []
    try:
        for m in relus:
            m.inplace = False
            handles.append(m.register_forward_hook(_SoftplusHook(float(beta))))
        yield model
    finally:
        for h in handles:
            h.remove()
        for m, flag in zip(relus, flags):
            m.inplace = flag
