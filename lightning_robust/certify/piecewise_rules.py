"""Rules of the piecewise-linear activations (ReLU, LeakyReLU, Hardtanh/ReLU6/clamp) and max pooling: the
activation pattern at ``x`` is frozen and each kink records the half-space that keeps it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lightning_robust.certify.operator_norms import nonneg_operator_norm_bound
from lightning_robust.certify.traced import (
    Traced,
    _method,
    _new,
    _record,
    _register,
    _tuple,
)


def _piecewise(x: Traced, breakpoints: list[tuple[float, int]], slope: torch.Tensor) -> Traced:
    """Record ``sign * (value - b) >= 0`` for each breakpoint ``b`` and scale the tangent by ``slope``."""
    v = x.value
    for b, _ in breakpoints:
        s = torch.where(v > b, 1.0, -1.0).to(v.dtype)
        normal = None if x.tangent is None else x.tangent * s.unsqueeze(1)
        _record(x, (v - b) * s, normal)
    tangent = None if x.tangent is None else x.tangent * slope.unsqueeze(1)
    return _new(x, v, tangent, x.lip)


@_register(F.relu, torch.relu, torch.relu_, F.relu_, torch.Tensor.relu, torch.Tensor.relu_)
@_method("relu")
def _relu(input: Traced, inplace: bool = False) -> Traced:
    x = input
    slope = (x.value > 0).to(x.value.dtype)
    out = _piecewise(x, [(0.0, 0)], slope)
    out.value = F.relu(x.value)
    return out


@_register(F.leaky_relu, F.leaky_relu_)
def _leaky_relu(input: Traced, negative_slope: float = 0.01, inplace: bool = False) -> Traced:
    x = input
    slope = torch.where(x.value > 0, 1.0, float(negative_slope)).to(x.value.dtype)
    out = _piecewise(x, [(0.0, 0)], slope)
    out.value = F.leaky_relu(x.value, negative_slope)
    if out.lip is not None:
        out.lip = out.lip * max(1.0, abs(float(negative_slope)))
    return out


def _clip(x: Traced, lo: float | None, hi: float | None) -> Traced:
    v = x.value
    inside = torch.ones_like(v, dtype=torch.bool)
    bps: list[tuple[float, int]] = []
    if lo is not None:
        inside &= v > lo
        bps.append((float(lo), 0))
    if hi is not None:
        inside &= v < hi
        bps.append((float(hi), 1))
    out = _piecewise(x, bps, inside.to(v.dtype))
    out.value = torch.clamp(v, lo, hi)
    return out


@_register(F.hardtanh, F.hardtanh_)
def _hardtanh(input: Traced, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> Traced:
    return _clip(input, min_val, max_val)


@_register(F.relu6)
def _relu6(input: Traced, inplace: bool = False) -> Traced:
    return _clip(input, 0.0, 6.0)


@_register(torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clip)
@_method("clamp")
def _clamp(input: Traced, min: Any = None, max: Any = None) -> Traced:
    x = input
    for bound in (min, max):
        if bound is not None and not isinstance(bound, (int, float)):
            raise x.state.fail("clamps with tensor bounds (only constant scalar bounds are supported)")
    return _clip(x, min, max)



def _max_pool_handler(nd: int) -> Callable[..., Any]:
    def handler(input: Traced, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                ceil_mode: bool = False, return_indices: bool = False) -> Any:
        x = input
        if ceil_mode:
            raise x.state.fail("max-pools with ceil_mode=True, which is not supported")
        k = _tuple(kernel_size, nd)
        s = _tuple(stride if stride not in (None, []) else kernel_size, nd)
        p, d = _tuple(padding, nd), _tuple(dilation, nd)
        out = _max_pool(x, k, s, p, d)
        if return_indices:
            raise x.state.fail("asks max pooling for its indices, which is not supported")
        return out

    return handler


def _windows(t: torch.Tensor, k: Sequence[int], s: Sequence[int], p: Sequence[int], d: Sequence[int]
             ) -> torch.Tensor:
    """``[..., H, W] -> [..., Ho, Wo, kh * kw]``: the zero-padded pooling windows (strided views, no im2col)."""
    t = F.pad(t, (p[1], p[1], p[0], p[0])) if any(p) else t
    ke = [(kk - 1) * dd + 1 for kk, dd in zip(k, d)]
    win = t.unfold(-2, ke[0], s[0]).unfold(-2, ke[1], s[1])  # [..., Ho, Wo, ke0, ke1]
    return win[..., :: d[0], :: d[1]].flatten(-2)


def _max_pool(x: Traced, k: tuple[int, ...], s: tuple[int, ...], p: tuple[int, ...], d: tuple[int, ...]) -> Traced:
    nd = len(k)
    if nd == 3:
        raise x.state.fail("applies 3-d max pooling, which is not supported")
    v = x.value
    k2: tuple[int, ...]
    s2: tuple[int, ...]
    p2: tuple[int, ...]
    d2: tuple[int, ...]
    if nd == 1:  # run the 2-d code on a height-1 image
        v2 = v.unsqueeze(-2)
        k2, s2, p2, d2 = (1, k[0]), (1, s[0]), (0, p[0]), (1, d[0])
    else:
        v2, k2, s2, p2, d2 = v, k, s, p, d
    b, c = v2.shape[:2]
    h, w = v2.shape[-2:]
    pooled, idx = F.max_pool2d(v2, k2, s2, p2, d2, return_indices=True)
    out_value = pooled.squeeze(-2) if nd == 1 else pooled
    tangent = None
    if x.tangent is not None:
        t = x.tangent.unsqueeze(-2) if nd == 1 else x.tangent
        t = t.expand(b, *t.shape[1:])  # a batch-shared tangent becomes per-sample here
        nt = t.shape[1]
        tflat = t.reshape(b, nt, c, h * w)
        gidx = idx.reshape(b, 1, c, -1).expand(b, nt, c, idx[0, 0].numel())
        win_t = tflat.gather(3, gidx)
        tangent = win_t.reshape(b, nt, *pooled.shape[1:])
        if nd == 1:
            tangent = tangent.squeeze(-2)
        # Facets: winner(o) - element k of window(o) >= 0 for every other in-image element k.
        pos = torch.arange(1, h * w + 1, dtype=v.dtype, device=v.device).reshape(1, 1, h, w)
        pos_w = _windows(pos, k2, s2, p2, d2).round().long()  # [1, 1, Ho, Wo, K]; 0 marks padding
        winner_pos = idx.unsqueeze(-1) + 1  # [b, c, Ho, Wo, 1]
        valid = (pos_w != 0) & (pos_w != winner_pos)  # [b, c, Ho, Wo, K]
        slack = pooled.unsqueeze(-1) - _windows(v2, k2, s2, p2, d2)
        slack = torch.where(valid, slack, torch.full_like(slack, math.inf))
        normal = win_t.reshape(b, nt, *pooled.shape[1:], 1) - _windows(t, k2, s2, p2, d2)
        normal = torch.where(valid.unsqueeze(1), normal, torch.zeros_like(normal))
        _record(x, slack, normal)
    lip = None
    if x.lip is not None:
        def window_sum(o: torch.Tensor) -> torch.Tensor:
            return F.unfold(o.reshape(1, 1, h, w), k2, d2, p2, s2)

        # |max_W a - max_W b| <= ||a - b||_W, so ||pool(a) - pool(b)||^2 <= (max multiplicity) ||a - b||^2.
        mult = nonneg_operator_norm_bound(window_sum, (h, w), v.dtype, v.device)
        lip = x.lip * mult  # sqrt(max row sum (=1 per window entry) * max column sum (= multiplicity))
    return _new(x, out_value, tangent, lip)


for _nd, _mp in ((1, F.max_pool1d), (2, F.max_pool2d), (3, F.max_pool3d)):
    _register(_mp)(_max_pool_handler(_nd))
