"""Exact propagation of a piecewise-linear network's local affine map (and a global Lipschitz bound).

A ReLU network is affine on each activation region: once the sign of every ReLU input (and the winner
of every max-pooling window) is frozen at the point ``x``, every layer is an affine map, so the logits
are ``W z + b`` for all ``z`` in the polyhedron where those signs hold. This module runs the real
``forward`` of any ``nn.Module`` on a stand-in object, :class:`Traced`, that carries

* ``value``: the ordinary activation at ``x``, ``[B, *shape]``;
* ``tangent``: the Jacobian of that activation along ``T`` input directions, ``[B, T, *shape]`` (pushed
  through each layer's linear part with the activation pattern of ``x`` frozen); its batch dimension may
  be 1 while it is still the same for every sample (before the first ReLU), which saves the first
  layers' work;
* ``lip``: an upper bound on the layer's global L2 Lipschitz constant as a function of the input
  (optional; used by the decision-boundary certificate).

Every torch operation the forward applies to a :class:`Traced` goes through ``__torch_function__`` and
is looked up in a whitelist of operations whose exact local-affine rule is implemented here. Anything
else (softplus, GELU, sigmoid, the product of two input-dependent tensors, train-mode BatchNorm,
dropout in training mode, ...) raises :class:`NotPiecewiseLinearError` naming the layer and the
operation: an unknown operation can never yield a wrong certificate. Each piecewise-linear operation
also records the half-spaces ``c_i(z) = c_i(x) + a_i . (z - x) >= 0`` that keep its pattern fixed (the
facets of the activation polyhedron).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NotPiecewiseLinearError", "Traced", "TraceState", "trace_model"]


class NotPiecewiseLinearError(ValueError):
    """The network applies an operation without an exact piecewise-linear rule (no certificate possible)."""


@dataclass
class Constraint:
    """Half-spaces ``slack + normal . (z - x) >= 0`` recorded by one piecewise-linear operation.

    ``slack`` is ``[B, n]`` (``+inf`` marks an entry that never binds); ``normal`` is ``[B, T, n]``
    along the propagated input directions (``None`` when tangents are not tracked).
    """

    layer: str
    slack: torch.Tensor
    normal: torch.Tensor | None


@dataclass
class TraceState:
    """What one traced forward pass collects: the module stack (for error messages) and the constraints."""

    track_tangent: bool
    track_lip: bool
    stack: list[tuple[str, str]] = field(default_factory=list)
    constraints: list[Constraint] = field(default_factory=list)

    def where(self) -> str:
        if not self.stack:
            return "the model's forward"
        name, cls = self.stack[-1]
        return f"layer {name!r} ({cls})" if name else f"the top-level module ({cls})"

    def fail(self, what: str) -> NotPiecewiseLinearError:
        return NotPiecewiseLinearError(
            f"{self.where()} {what}; certificates need a piecewise-linear network built from Linear, "
            "Conv1d/2d/3d, ReLU, LeakyReLU, ReLU6/Hardtanh/clamp, max or average pooling, eval-mode "
            "BatchNorm, Flatten/reshape, padding, concatenation, residual additions and constant "
            "affine maps (such as Normalize)"
        )


class _UnsupportedAttributeError(NotPiecewiseLinearError, AttributeError):
    """A missing tensor method on :class:`Traced` (``hasattr`` sees ``False``, a call sees the message)."""


_HANDLERS: dict[Callable[..., Any], Callable[..., Any]] = {}


def _register(*funcs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(handler: Callable[..., Any]) -> Callable[..., Any]:
        for f in funcs:
            _HANDLERS[f] = handler
        return handler

    return deco


def _find_state(obj: Any) -> TraceState | None:
    if isinstance(obj, Traced):
        return obj.state
    if isinstance(obj, (list, tuple)):
        for o in obj:
            s = _find_state(o)
            if s is not None:
                return s
    if isinstance(obj, dict):
        for o in obj.values():
            s = _find_state(o)
            if s is not None:
                return s
    return None


class Traced:
    """An activation together with its input Jacobian (along ``T`` directions) and Lipschitz bound."""

    __slots__ = ("head", "lip", "state", "tangent", "value")

    def __init__(self, value: torch.Tensor, tangent: torch.Tensor | None, lip: torch.Tensor | None,
                 state: TraceState, head: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.value, self.tangent, self.lip, self.state = value, tangent, lip, state
        # (weight, Lipschitz bound of the input) when this tensor is the output of a final F.linear:
        # lets margins f_y - f_j use the row difference ||W_y - W_j|| instead of sqrt(2) ||W||.
        self.head = head

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None:
            state = _find_state(list(args) + list(kwargs.values()))
            name = getattr(func, "__name__", repr(func))
            err = state.fail(f"applies `{name}`, which is not a supported piecewise-linear operation") if state \
                else NotPiecewiseLinearError(f"unsupported operation `{name}` on a traced activation")
            raise err
        return handler(*args, **kwargs)

    # ---- tensor-like surface used by module code (shapes, dtypes) ----
    @property
    def shape(self) -> torch.Size:
        return self.value.shape

    @property
    def ndim(self) -> int:
        return self.value.ndim

    @property
    def dtype(self) -> torch.dtype:
        return self.value.dtype

    @property
    def device(self) -> torch.device:
        return self.value.device

    @property
    def is_cuda(self) -> bool:
        return self.value.is_cuda

    def dim(self) -> int:
        return self.value.dim()

    def size(self, dim: int | None = None) -> Any:
        return self.value.size() if dim is None else self.value.size(dim)

    def numel(self) -> int:
        return self.value.numel()

    def is_floating_point(self) -> bool:
        return self.value.is_floating_point()

    def __len__(self) -> int:
        return len(self.value)

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not defined here: a tensor method without a local-affine rule. The
        # error is also an AttributeError so that ``hasattr`` probes in foreign code keep working.
        state = object.__getattribute__(self, "state")
        err = state.fail(f"calls the tensor method `.{name}`, which is not a supported piecewise-linear operation")
        raise _UnsupportedAttributeError(str(err))

    def __bool__(self) -> bool:
        raise self.state.fail("branches on the value of an input-dependent tensor")

    # Comparisons build masks (``z * (z > 0)``, ``torch.where(z > 0, z, 0.1 * z)``) whose pattern depends on
    # the input: without these, Python answered ``>`` with a bare TypeError and ``==`` with identity (a
    # silent ``False`` mask). They have no local-affine rule here; F.relu / nn.LeakyReLU do.
    def _compare(self, op: str) -> NotPiecewiseLinearError:
        return self.state.fail(f"compares an input-dependent tensor with `{op}` (a mask such as `z * (z > 0)` "
                               "or `torch.where(z > 0, ...)`; use nn.ReLU, F.relu or nn.LeakyReLU instead)")

    def __gt__(self, other: Any) -> Any:
        raise self._compare(">")

    def __ge__(self, other: Any) -> Any:
        raise self._compare(">=")

    def __lt__(self, other: Any) -> Any:
        raise self._compare("<")

    def __le__(self, other: Any) -> Any:
        raise self._compare("<=")

    def __eq__(self, other: Any) -> Any:
        raise self._compare("==")

    def __ne__(self, other: Any) -> Any:
        raise self._compare("!=")

    __hash__ = object.__hash__

    # ---- methods and operators ----
    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Traced:
        return _flatten(self, start_dim, end_dim)

    def view(self, *shape: Any) -> Traced:
        return _reshape(self, *shape)

    def reshape(self, *shape: Any) -> Traced:
        return _reshape(self, *shape)

    def unflatten(self, dim: int, sizes: Sequence[int]) -> Traced:
        return _unflatten(self, dim, sizes)

    def permute(self, *dims: Any) -> Traced:
        return _permute(self, *dims)

    def transpose(self, dim0: int, dim1: int) -> Traced:
        return _transpose(self, dim0, dim1)

    def unsqueeze(self, dim: int) -> Traced:
        return _unsqueeze(self, dim)

    def squeeze(self, dim: int | None = None) -> Traced:
        return _squeeze(self, dim)

    def contiguous(self, *args: Any, **kwargs: Any) -> Traced:
        return self

    def clone(self, *args: Any, **kwargs: Any) -> Traced:
        return self

    def mean(self, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Traced:
        return _mean(self, dim, keepdim)

    def sum(self, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Traced:
        return _sum(self, dim, keepdim)

    def relu(self) -> Traced:
        return _relu(self)

    def relu_(self) -> Traced:
        return _relu(self)

    def clamp(self, min: Any = None, max: Any = None) -> Traced:
        return _clamp(self, min, max)

    clip = clamp

    def __getitem__(self, idx: Any) -> Traced:
        return _getitem(self, idx)

    def __add__(self, other: Any) -> Traced:
        return _add(self, other)

    __radd__ = __add__
    __iadd__ = __add__

    def __sub__(self, other: Any) -> Traced:
        return _add(self, other, alpha=-1)

    __isub__ = __sub__

    def __rsub__(self, other: Any) -> Traced:
        return _add(_neg(self), other)

    def __mul__(self, other: Any) -> Traced:
        return _mul(self, other)

    __rmul__ = __mul__
    __imul__ = __mul__

    def __truediv__(self, other: Any) -> Traced:
        return _div(self, other)

    __itruediv__ = __truediv__

    def __rtruediv__(self, other: Any) -> Traced:
        raise self.state.fail("divides by an input-dependent tensor")

    def __neg__(self) -> Traced:
        return _neg(self)

    def __pos__(self) -> Traced:
        return self

    def __matmul__(self, other: Any) -> Traced:
        return _matmul(self, other)

    def __rmatmul__(self, other: Any) -> Traced:
        raise self.state.fail("multiplies an input-dependent tensor from the left with `@`")


# --------------------------------------------------------------------------------------------------
# helpers


def _new(x: Traced, value: torch.Tensor, tangent: torch.Tensor | None, lip: torch.Tensor | None) -> Traced:
    return Traced(value, tangent, lip, x.state)


def _flat_bt(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(0, 1)


def _unflat_bt(t: torch.Tensor, b: int, n: int) -> torch.Tensor:
    return t.unflatten(0, (b, n))


def _tdim(x: Traced, dim: int, allow_end: bool = False) -> int:
    """Map a value dimension to the tangent dimension; the batch dimension is off limits."""
    nd = x.value.ndim + (1 if allow_end else 0)
    d = dim + nd if dim < 0 else dim
    if d <= 0 or d >= nd:
        raise x.state.fail(f"operates on dimension {dim} of a {x.value.ndim}-d activation (the batch dimension "
                           "or out of range), which would mix samples")
    return d + 1


def _const(x: Traced, other: Any, what: str) -> torch.Tensor | float:
    if isinstance(other, Traced):
        raise x.state.fail(f"{what} two input-dependent tensors (not piecewise linear)")
    if isinstance(other, torch.Tensor):
        return other
    if isinstance(other, (int, float)):
        return float(other)
    raise x.state.fail(f"{what} an unsupported operand of type {type(other).__name__}")


def _broadcast_tangent(x: Traced, t: torch.Tensor, value_shape: torch.Size) -> torch.Tensor:
    if len(value_shape) != x.value.ndim or value_shape[0] != x.value.shape[0]:
        raise x.state.fail(f"broadcasts an activation of shape {tuple(x.value.shape)} to {tuple(value_shape)}, "
                           "which changes its batch layout")
    return t.expand(t.shape[0], t.shape[1], *value_shape[1:])


def _const_for_tangent(x: Traced, c: torch.Tensor) -> torch.Tensor:
    """Align a constant broadcast against the value ``[B, ...]`` with the tangent ``[B, T, ...]``."""
    if c.ndim > x.value.ndim:
        raise x.state.fail(f"combines an activation of shape {tuple(x.value.shape)} with a constant of shape "
                           f"{tuple(c.shape)} that has more dimensions")
    return c.unsqueeze(1) if c.ndim == x.value.ndim else c


def _abs_max(c: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    if isinstance(c, torch.Tensor):
        return c.detach().abs().max().to(torch.float64) if c.numel() else torch.zeros((), dtype=torch.float64)
    return torch.tensor(abs(c), dtype=torch.float64)


def _record(x: Traced, slack: torch.Tensor, normal: torch.Tensor | None) -> None:
    st = x.state
    if not st.track_tangent:
        return
    b = slack.shape[0]
    st.constraints.append(Constraint(
        layer=st.where(),
        slack=slack.reshape(b, -1),
        normal=None if normal is None else normal.expand(b, *normal.shape[1:]).reshape(b, normal.shape[1], -1),
    ))


def _tuple(v: Any, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    t = tuple(int(i) for i in v)
    return t * n if len(t) == 1 else t


# --------------------------------------------------------------------------------------------------
# linear layers


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


def _matmul(x: Traced, other: Any) -> Traced:
    w = _const(x, other, "multiplies")
    if not isinstance(w, torch.Tensor) or w.ndim != 2:
        raise x.state.fail("multiplies with `@` by something other than a constant matrix")
    return _linear(x, w.t())


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


# --------------------------------------------------------------------------------------------------
# piecewise-linear activations


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
def _clamp(input: Traced, min: Any = None, max: Any = None) -> Traced:
    x = input
    for bound in (min, max):
        if bound is not None and not isinstance(bound, (int, float)):
            raise x.state.fail("clamps with tensor bounds (only constant scalar bounds are supported)")
    return _clip(x, min, max)


# --------------------------------------------------------------------------------------------------
# pooling


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


# --------------------------------------------------------------------------------------------------
# shape operations


@_register(torch.flatten, torch.Tensor.flatten)
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
def _unflatten(input: Traced, dim: int, sizes: Sequence[int]) -> Traced:
    x = input
    td = _tdim(x, dim)
    tangent = None if x.tangent is None else x.tangent.unflatten(td, sizes)
    return _new(x, x.value.unflatten(dim, sizes), tangent, x.lip)


@_register(torch.reshape, torch.Tensor.reshape, torch.Tensor.view)
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
def _transpose(input: Traced, dim0: int, dim1: int) -> Traced:
    x = input
    a, b = _tdim(x, dim0), _tdim(x, dim1)
    tangent = None if x.tangent is None else x.tangent.transpose(a, b)
    return _new(x, x.value.transpose(dim0, dim1), tangent, x.lip)


@_register(torch.unsqueeze, torch.Tensor.unsqueeze)
def _unsqueeze(input: Traced, dim: int) -> Traced:
    x = input
    td = _tdim(x, dim, allow_end=True)
    tangent = None if x.tangent is None else x.tangent.unsqueeze(td)
    return _new(x, x.value.unsqueeze(dim), tangent, x.lip)


@_register(torch.squeeze, torch.Tensor.squeeze)
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


# --------------------------------------------------------------------------------------------------
# arithmetic


@_register(torch.add, torch.Tensor.add)
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
def _neg(input: Traced) -> Traced:
    x = input
    tangent = None if x.tangent is None else -x.tangent
    return _new(x, -x.value, tangent, x.lip)


@_register(torch.mul, torch.multiply, torch.Tensor.mul)
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
def _mean(input: Traced, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Traced:
    x = input
    dims = _reduce_dims(x, dim)
    n = math.prod(x.value.shape[d] for d in dims)
    value = x.value.mean(dims, keepdim=keepdim)
    tangent = None if x.tangent is None else x.tangent.mean([d + 1 for d in dims], keepdim=keepdim)
    lip = None if x.lip is None else x.lip / math.sqrt(max(n, 1))
    return _new(x, value, tangent, lip)


@_register(torch.sum, torch.Tensor.sum)
def _sum(input: Traced, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Traced:
    x = input
    dims = _reduce_dims(x, dim)
    n = math.prod(x.value.shape[d] for d in dims)
    value = x.value.sum(dims, keepdim=keepdim)
    tangent = None if x.tangent is None else x.tangent.sum([d + 1 for d in dims], keepdim=keepdim)
    lip = None if x.lip is None else x.lip * math.sqrt(n)
    return _new(x, value, tangent, lip)


# --------------------------------------------------------------------------------------------------
# driver


@contextmanager
def _module_stack(model: nn.Module, state: TraceState) -> Iterator[None]:
    handles = []

    def push(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            state.stack.append((name, type(module).__name__))

        return hook

    def pop(module: nn.Module, args: Any, output: Any) -> None:
        if state.stack:
            state.stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(push(name)))
        handles.append(module.register_forward_hook(pop))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def trace_model(model: nn.Module, x: torch.Tensor, tangent: torch.Tensor | None = None,
                track_lip: bool = False) -> tuple[Traced, TraceState]:
    """Run ``model`` (in eval mode) on ``x`` with tangents ``[B, T, *x.shape[1:]]``; return output and state.

    Raises:
        NotPiecewiseLinearError: on an operation without an exact piecewise-linear rule.
    """
    state = TraceState(track_tangent=tangent is not None, track_lip=track_lip)
    lip = torch.ones((), dtype=torch.float64, device=x.device) if track_lip else None
    inp = Traced(x, tangent, lip, state)
    with eval_mode(model), _module_stack(model, state):
        out = model(inp)
    if not isinstance(out, Traced):
        raise NotPiecewiseLinearError(
            f"the model returned {type(out).__name__}, not a tensor computed from its input; certificates "
            "need a net mapping an input batch to logits [B, K]")
    if out.value.ndim != 2:
        raise NotPiecewiseLinearError(
            f"the model's output must be logits of shape [B, K], got {tuple(out.value.shape)}")
    return out, state
