"""Local-affine rules of the linear layers: Linear, ``@``, convolutions, eval-mode BatchNorm, average
pooling, dropout (eval) and padding; their tangents are the same linear map, their Lipschitz factor its norm.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lightning_robust.certify.operator_norms import conv_norm_bound, conv_padding_total, nonneg_operator_norm_bound
from lightning_robust.certify.traced import (
    Traced,
    _const,
    _flat_bt,
    _method,
    _new,
    _register,
    _tuple,
    _unflat_bt,
)


@_register(F.linear)
def _linear(input: Traced, weight: Any, bias: Any = None) -> Traced:
    x = input
    _const(x, weight, "multiplies")
    if bias is not None:
        _const(x, bias, "adds")
    value = F.linear(x.value, weight, bias)
    tangent = None if x.tangent is None else F.linear(x.tangent, weight)
    lip = None
    head = None
    if x.lip is not None:
        lip = x.lip * torch.linalg.matrix_norm(weight.detach().to(torch.float64), ord=2)
        if value.ndim == 2:
            head = (weight, x.lip)
    out = _new(x, value, tangent, lip)
    out.head = head
    return out


@_method("matmul")
def _matmul(x: Traced, other: Any) -> Traced:
    w = _const(x, other, "multiplies")
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise x.state.fail("multiplies with `@` by something other than a constant matrix")
    return _linear(x, w.t())



def _conv_handler(func: Callable[..., torch.Tensor], nd: int) -> Callable[..., Traced]:
    def handler(input: Traced, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                dilation: Any = 1, groups: int = 1) -> Traced:
        x = input
        _const(x, weight, "convolves")
        if bias is not None:
            _const(x, bias, "adds")
        value = func(x.value, weight, bias, stride, padding, dilation, groups)
        tangent = None
        if x.tangent is not None:
            b, t = x.tangent.shape[:2]
            tangent = _unflat_bt(func(_flat_bt(x.tangent), weight, None, stride, padding, dilation, groups), b, t)
        lip = None
        if x.lip is not None:
            dil = _tuple(dilation, nd)
            pad = conv_padding_total(padding, weight.shape[2:], dil)
            lip = x.lip * conv_norm_bound(weight.detach(), x.value.shape[2:], pad, dil, groups)
        return _new(x, value, tangent, lip)

    return handler


for _nd, _f in ((1, F.conv1d), (2, F.conv2d), (3, F.conv3d)):
    _register(_f)(_conv_handler(_f, _nd))


@_register(F.batch_norm)
def _batch_norm(input: Traced, running_mean: Any, running_var: Any, weight: Any = None, bias: Any = None,
                training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Traced:
    x = input
    if training or running_mean is None or running_var is None:
        raise x.state.fail("normalizes with batch statistics (BatchNorm in training mode or without running "
                           "statistics), which couples the samples and is not affine")
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    value = F.batch_norm(x.value, running_mean, running_var, weight, bias, False, momentum, eps)
    shape = [1, -1] + [1] * (x.value.ndim - 2)
    tangent = None if x.tangent is None else x.tangent * scale.reshape(1, *shape)
    lip = None if x.lip is None else x.lip * scale.detach().abs().max().to(torch.float64)
    return _new(x, value, tangent, lip)



def _linear_op_handler(func: Callable[..., torch.Tensor], nd: int) -> Callable[..., Traced]:
    """Average pooling and similar non-negative, channel-wise linear maps: same op on the tangent."""

    def handler(input: Traced, *args: Any, **kwargs: Any) -> Traced:
        x = input
        value = func(x.value, *args, **kwargs)
        tangent = None
        if x.tangent is not None:
            b, t = x.tangent.shape[:2]
            tangent = _unflat_bt(func(_flat_bt(x.tangent), *args, **kwargs), b, t)
        lip = None
        if x.lip is not None:
            spatial = x.value.shape[x.value.ndim - nd:]

            def op(o: torch.Tensor) -> torch.Tensor:
                return func(o.reshape(1, 1, *spatial), *args, **kwargs)

            lip = x.lip * nonneg_operator_norm_bound(op, spatial, x.value.dtype, x.value.device)
        return _new(x, value, tangent, lip)

    return handler


_POOLS: tuple[tuple[int, tuple[Callable[..., torch.Tensor], ...]], ...] = (
    (1, (F.avg_pool1d, F.adaptive_avg_pool1d)), (2, (F.avg_pool2d, F.adaptive_avg_pool2d)),
    (3, (F.avg_pool3d, F.adaptive_avg_pool3d)),
)
for _nd, _fs in _POOLS:
    for _pool in _fs:
        _register(_pool)(_linear_op_handler(_pool, _nd))


@_register(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
           torch.dropout)
def _dropout(input: Traced, p: float = 0.5, training: bool = True, inplace: bool = False) -> Traced:
    if training and p > 0:
        raise input.state.fail("applies dropout in training mode (random, not a fixed function)")
    return input


@_register(F.pad)
def _pad(input: Traced, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> Traced:
    x = input
    if len(pad) // 2 > x.value.ndim - 1:
        raise x.state.fail("pads the batch dimension")
    out_value = F.pad(x.value, pad, mode, value) if mode == "constant" else F.pad(x.value, pad, mode)
    tangent = None
    if x.tangent is not None:
        b, t = x.tangent.shape[:2]
        ft = _flat_bt(x.tangent)
        tangent = _unflat_bt(F.pad(ft, pad, mode) if mode != "constant" else F.pad(ft, pad), b, t)
    lip = None
    if x.lip is not None:
        n = len(pad) // 2
        shape = x.value.shape[-n:] if mode == "constant" else x.value.shape[2:]

        def op(o: torch.Tensor) -> torch.Tensor:
            o = o.reshape(1, 1, *shape)
            return F.pad(o, pad) if mode == "constant" else F.pad(o, pad, mode)

        lip = x.lip * nonneg_operator_norm_bound(op, shape, x.value.dtype, x.value.device)
    return _new(x, out_value, tangent, lip)
