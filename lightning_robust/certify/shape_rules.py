"""Rules of the shape operations (flatten, reshape/view, permute, transpose, (un)squeeze, indexing): the
tangent gets the same rearrangement, shifted by its direction dimension; the batch dimension stays put.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_robust.certify.traced import (
    Traced,
    _method,
    _new,
    _register,
    _tdim,
)


@_register(torch.flatten, torch.Tensor.flatten)
@_method("flatten")
def _flatten(input: Traced, start_dim: int = 0, end_dim: int = -1) -> Traced:
    x = input
    nd = x.value.ndim
    s = start_dim + nd if start_dim < 0 else start_dim
    e = end_dim + nd if end_dim < 0 else end_dim
    if s == 0:
        raise x.state.fail("flattens the batch dimension into the features")
    value = x.value.flatten(s, e)
    tangent = None if x.tangent is None else x.tangent.flatten(s + 1, e + 1)
    return _new(x, value, tangent, x.lip)


@_register(torch.unflatten, torch.Tensor.unflatten)
@_method("unflatten")
def _unflatten(input: Traced, dim: int, sizes: Sequence[int]) -> Traced:
    x = input
    td = _tdim(x, dim)
    tangent = None if x.tangent is None else x.tangent.unflatten(td, sizes)
    return _new(x, x.value.unflatten(dim, sizes), tangent, x.lip)


@_register(torch.reshape, torch.Tensor.reshape, torch.Tensor.view)
@_method("reshape")
def _reshape(input: Traced, *shape: Any) -> Traced:
    x = input
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    value = x.value.reshape(*shape)
    b = x.value.shape[0]
    if value.ndim == 0 or value.shape[0] != b:
        raise x.state.fail(f"reshapes an activation of shape {tuple(x.value.shape)} to {tuple(value.shape)}, "
                           "which moves the batch dimension")
    tangent = None if x.tangent is None else x.tangent.reshape(*x.tangent.shape[:2], *value.shape[1:])
    return _new(x, value, tangent, x.lip)


@_register(torch.permute, torch.Tensor.permute)
@_method("permute")
def _permute(input: Traced, *dims: Any) -> Traced:
    x = input
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    nd = x.value.ndim
    dims = tuple(d + nd if d < 0 else d for d in dims)
    if dims[0] != 0:
        raise x.state.fail("permutes the batch dimension")
    tangent = None if x.tangent is None else x.tangent.permute(0, 1, *[d + 1 for d in dims[1:]])
    return _new(x, x.value.permute(*dims), tangent, x.lip)


@_register(torch.transpose, torch.Tensor.transpose)
@_method("transpose")
def _transpose(input: Traced, dim0: int, dim1: int) -> Traced:
    x = input
    a, b = _tdim(x, dim0), _tdim(x, dim1)
    tangent = None if x.tangent is None else x.tangent.transpose(a, b)
    return _new(x, x.value.transpose(dim0, dim1), tangent, x.lip)


@_register(torch.unsqueeze, torch.Tensor.unsqueeze)
@_method("unsqueeze")
def _unsqueeze(input: Traced, dim: int) -> Traced:
    x = input
    td = _tdim(x, dim, allow_end=True)
    tangent = None if x.tangent is None else x.tangent.unsqueeze(td)
    return _new(x, x.value.unsqueeze(dim), tangent, x.lip)


@_register(torch.squeeze, torch.Tensor.squeeze)
@_method("squeeze")
def _squeeze(input: Traced, dim: Any = None) -> Traced:
    x = input
    if dim is None:
        dims = [i for i in range(1, x.value.ndim) if x.value.shape[i] == 1]
    else:
        dims = [dim] if isinstance(dim, int) else list(dim)
    value, tangent = x.value, x.tangent
    for d in sorted((_tdim(x, d) - 1 for d in dims), reverse=True):
        if value.shape[d] != 1:
            continue
        value = value.squeeze(d)
        tangent = None if tangent is None else tangent.squeeze(d + 1)
    return _new(x, value, tangent, x.lip)


@_method("getitem")
def _getitem(x: Traced, idx: Any) -> Traced:
    key = idx if isinstance(idx, tuple) else (idx,)
    for k in key:
        if not (isinstance(k, (slice, int)) or k is None or k is Ellipsis):
            raise x.state.fail("indexes an activation with tensors or lists (advanced indexing is not supported)")
    if not key:
        return x
    first = key[0]
    if first is Ellipsis:
        if any(k is None for k in key):
            raise x.state.fail("indexes with `...` and `None` together, which is not supported")
        tkey: tuple[Any, ...] = key
    elif isinstance(first, slice) and first == slice(None):
        tkey = (slice(None), slice(None), *key[1:])
    else:
        raise x.state.fail("indexes the batch dimension")
    value = x.value[key]
    tangent = None if x.tangent is None else x.tangent[tkey]
    return _new(x, value, tangent, x.lip)
