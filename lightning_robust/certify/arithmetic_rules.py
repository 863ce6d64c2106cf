"""Rules of arithmetic on traced activations: sums (residual connections), products and quotients with
constants, concatenation, mean and sum; a product of two input-dependent tensors is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lightning_robust.certify.traced import (
    Traced,
    _abs_max,
    _broadcast_tangent,
    _const,
    _const_for_tangent,
    _method,
    _new,
    _register,
    _tdim,
)


@_register(torch.add, torch.Tensor.add)
@_method("add")
def _add(input: Any, other: Any, alpha: float = 1) -> Traced:
    if not isinstance(input, Traced):  # c + alpha * x
        return _add(_mul(other, alpha), input)
    x = input
    if isinstance(other, Traced):
        value = x.value + alpha * other.value
        tangent = None
        if x.tangent is not None and other.tangent is not None:
            tangent = _broadcast_tangent(x, x.tangent, value.shape) + alpha * _broadcast_tangent(
                other, other.tangent, value.shape)
        lip = None
        if x.lip is not None and other.lip is not None:
            lip = x.lip + abs(alpha) * other.lip
        return _new(x, value, tangent, lip)
    c = _const(x, other, "adds")
    value = x.value + alpha * c
    tangent = None if x.tangent is None else _broadcast_tangent(x, x.tangent, value.shape)
    return _new(x, value, tangent, x.lip)


@_register(torch.sub, torch.subtract, torch.Tensor.sub)
def _sub(input: Any, other: Any, alpha: float = 1) -> Traced:
    if isinstance(input, Traced):
        return _add(input, other, alpha=-alpha)
    return _add(_mul(other, -alpha), input)


@_register(torch.neg, torch.Tensor.neg)
@_method("neg")
def _neg(input: Traced) -> Traced:
    x = input
    tangent = None if x.tangent is None else -x.tangent
    return _new(x, -x.value, tangent, x.lip)


@_register(torch.mul, torch.multiply, torch.Tensor.mul)
@_method("mul")
def _mul(input: Any, other: Any) -> Traced:
    if not isinstance(input, Traced):
        input, other = other, input
    x = input
    c = _const(x, other, "multiplies")
    value = x.value * c
    tangent = None
    if x.tangent is not None:
        ct = _const_for_tangent(x, c) if isinstance(c, torch.Tensor) else c
        tangent = _broadcast_tangent(x, x.tangent * ct, value.shape)
    lip = None if x.lip is None else x.lip * _abs_max(c, x.value)
    return _new(x, value, tangent, lip)


@_register(torch.div, torch.divide, torch.true_divide, torch.Tensor.div)
@_method("div")
def _div(input: Any, other: Any, rounding_mode: str | None = None) -> Traced:
    if not isinstance(input, Traced):
        raise other.state.fail("divides by an input-dependent tensor")
    x = input
    if rounding_mode is not None:
        raise x.state.fail("divides with rounding (not piecewise linear)")
    c = _const(x, other, "divides")
    return _mul(x, 1.0 / c)


@_register(torch.cat, torch.concat, torch.concatenate)
def _cat(tensors: Sequence[Any], dim: int = 0) -> Traced:
    traced = [t for t in tensors if isinstance(t, Traced)]
    x = traced[0]
    td = _tdim(x, dim)
    values = [t.value if isinstance(t, Traced) else t for t in tensors]
    value = torch.cat(values, dim)
    tangent = None
    if x.tangent is not None:
        b, n = value.shape[0], x.tangent.shape[1]
        parts = []
        for t in tensors:
            if isinstance(t, Traced):
                assert t.tangent is not None
                parts.append(t.tangent.expand(b, *t.tangent.shape[1:]))
            else:
                c = torch.as_tensor(t)
                parts.append(torch.zeros(b, n, *c.shape[1:], dtype=x.tangent.dtype, device=x.tangent.device))
        tangent = torch.cat(parts, td)
    lip = None
    if all(t.lip is not None for t in traced):
        lip = torch.sqrt(sum((t.lip**2 for t in traced), torch.zeros((), dtype=torch.float64)))  # type: ignore[operator]
    return _new(x, value, tangent, lip)


def _reduce_dims(x: Traced, dim: Any) -> list[int]:
    if dim is None:
        raise x.state.fail("reduces over all dimensions, including the batch")
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [_tdim(x, d) - 1 for d in dims]


@_register(torch.mean, torch.Tensor.mean)
@_method("mean")
def _mean(input: Traced, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Traced:
    x = input
    dims = _reduce_dims(x, dim)
    n = math.prod(x.value.shape[d] for d in dims)
    value = x.value.mean(dims, keepdim=keepdim)
    tangent = None if x.tangent is None else x.tangent.mean([d + 1 for d in dims], keepdim=keepdim)
    lip = None if x.lip is None else x.lip / math.sqrt(max(n, 1))
    return _new(x, value, tangent, lip)


@_register(torch.sum, torch.Tensor.sum)
@_method("sum")
def _sum(input: Traced, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Traced:
    x = input
    dims = _reduce_dims(x, dim)
    n = math.prod(x.value.shape[d] for d in dims)
    value = x.value.sum(dims, keepdim=keepdim)
    tangent = None if x.tangent is None else x.tangent.sum([d + 1 for d in dims], keepdim=keepdim)
    lip = None if x.lip is None else x.lip * math.sqrt(n)
    return _new(x, value, tangent, lip)
