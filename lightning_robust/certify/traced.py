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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Constraint", "NotPiecewiseLinearError", "TraceState", "Traced"]


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
# Rules that Traced's own methods and operators (``x.flatten()``, ``x + y``, ``x[..., 1:]``) call, by name;
# the rule modules fill both tables when :mod:`lightning_robust.certify.tracing` imports them.
_METHODS: dict[str, Callable[..., Any]] = {}


def _register(*funcs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(handler: Callable[..., Any]) -> Callable[..., Any]:
        for f in funcs:
            _HANDLERS[f] = handler
        return handler

    return deco


def _method(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(rule: Callable[..., Any]) -> Callable[..., Any]:
        _METHODS[name] = rule
        return rule

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
        return _METHODS["flatten"](self, start_dim, end_dim)

    def view(self, *shape: Any) -> Traced:
        return _METHODS["reshape"](self, *shape)

    def reshape(self, *shape: Any) -> Traced:
        return _METHODS["reshape"](self, *shape)

    def unflatten(self, dim: int, sizes: Sequence[int]) -> Traced:
        return _METHODS["unflatten"](self, dim, sizes)

    def permute(self, *dims: Any) -> Traced:
        return _METHODS["permute"](self, *dims)

    def transpose(self, dim0: int, dim1: int) -> Traced:
        return _METHODS["transpose"](self, dim0, dim1)

    def unsqueeze(self, dim: int) -> Traced:
        return _METHODS["unsqueeze"](self, dim)

    def squeeze(self, dim: int | None = None) -> Traced:
        return _METHODS["squeeze"](self, dim)

    def contiguous(self, *args: Any, **kwargs: Any) -> Traced:
        return self

    def clone(self, *args: Any, **kwargs: Any) -> Traced:
        return self

    def mean(self, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Traced:
        return _METHODS["mean"](self, dim, keepdim)

    def sum(self, dim: Any = None, keepdim: bool = False, dtype: Any = None) -> Traced:
        return _METHODS["sum"](self, dim, keepdim)

    def relu(self) -> Traced:
        return _METHODS["relu"](self)

    def relu_(self) -> Traced:
        return _METHODS["relu"](self)

    def clamp(self, min: Any = None, max: Any = None) -> Traced:
        return _METHODS["clamp"](self, min, max)

    clip = clamp

    def __getitem__(self, idx: Any) -> Traced:
        return _METHODS["getitem"](self, idx)

    def __add__(self, other: Any) -> Traced:
        return _METHODS["add"](self, other)

    __radd__ = __add__
    __iadd__ = __add__

    def __sub__(self, other: Any) -> Traced:
        return _METHODS["add"](self, other, alpha=-1)

    __isub__ = __sub__

    def __rsub__(self, other: Any) -> Traced:
        return _METHODS["add"](_METHODS["neg"](self), other)

    def __mul__(self, other: Any) -> Traced:
        return _METHODS["mul"](self, other)

    __rmul__ = __mul__
    __imul__ = __mul__

    def __truediv__(self, other: Any) -> Traced:
        return _METHODS["div"](self, other)

    __itruediv__ = __truediv__

    def __rtruediv__(self, other: Any) -> Traced:
        raise self.state.fail("divides by an input-dependent tensor")

    def __neg__(self) -> Traced:
        return _METHODS["neg"](self)

    def __pos__(self) -> Traced:
        return self

    def __matmul__(self, other: Any) -> Traced:
        return _METHODS["matmul"](self, other)

    def __rmatmul__(self, other: Any) -> Traced:
        raise self.state.fail("multiplies an input-dependent tensor from the left with `@`")


# helpers shared by the rule modules


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
