"""Upper bounds on the L2 operator norm of convolutions and non-negative linear maps (global Lipschitz bounds)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_robust.certify.traced import _tuple

__all__ = ["conv_norm_bound", "conv_padding_total", "nonneg_operator_norm_bound"]


def conv_padding_total(padding: Any, kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    """Total zero padding per spatial dimension of a convolution (``"same"``, ``"valid"`` or numbers)."""
    n = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * n
        return tuple(d * (k - 1) for k, d in zip(kernel, dilation))
    return tuple(2 * p for p in _tuple(padding, n))


def conv_norm_bound(weight: torch.Tensor, input_size: Sequence[int], padding_total: Sequence[int],
                    dilation: Sequence[int], groups: int) -> torch.Tensor:
    """Upper bound on the L2 operator norm of a zero-padded convolution (any stride), in float64.

    The padded input is embedded isometrically in a grid of side ``N = size + padding`` on which the
    convolution's outputs are entries of the circular convolution (no wrap-around for valid positions),
    and striding only drops outputs; so the norm is at most that of the circular convolution, which is
    exactly ``max_w sigma_max(K_hat(w))`` over the DFT frequencies of the grid (Sedghi, Gupta & Long
    2019, arXiv 1805.10408, Theorem 6). Groups make the operator block diagonal (max over groups).
    """
    w = weight.to(torch.float64)
    nd = w.ndim - 2
    k_eff = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dilation)]
    if any(d > 1 for d in dilation):
        dil = torch.zeros(*w.shape[:2], *k_eff, dtype=w.dtype, device=w.device)
        dil[(slice(None), slice(None), *[slice(None, None, d) for d in dilation])] = w
        w = dil
    grid = [max(s + p, k) for s, p, k in zip(input_size, padding_total, k_eff)]
    spatial = list(range(2, 2 + nd))
    khat = torch.fft.fftn(w, s=grid, dim=spatial)  # [Co, Ci/g, *grid]
    co, cig = khat.shape[:2]
    khat = khat.reshape(groups, co // groups, cig, -1).permute(0, 3, 1, 2)  # [g, freqs, Co/g, Ci/g]
    return torch.linalg.matrix_norm(khat, ord=2).max()


def nonneg_operator_norm_bound(op: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int],
                               dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``sqrt(max row sum * max column sum)`` >= ``||A||_2`` for a linear ``op`` with non-negative entries.

    (Schur's test.) Row sums are ``A 1`` and column sums ``A^T 1``, both obtained with one forward and
    one backward pass; used for average pooling, padding and the window multiplicity of max pooling.
    """
    ones = torch.ones(1, 1, *shape, dtype=torch.float64, device=device, requires_grad=True)
    with torch.enable_grad():
        out = op(ones)
        (cols,) = torch.autograd.grad(out.sum(), ones)
    return (out.detach().max() * cols.max()).clamp_min(0).sqrt()
