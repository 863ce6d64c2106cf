"""Run a module's real ``forward`` on a :class:`~lightning_robust.certify.traced.Traced` input (the driver).

Importing the rule modules registers every supported operation; :func:`trace_model` then puts the
model in eval mode, names the layer being run (for error messages) and returns the traced logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lightning_robust.certify import arithmetic_rules, linear_rules, piecewise_rules, shape_rules  # noqa: F401
from lightning_robust.certify.traced import NotPiecewiseLinearError, Traced, TraceState
from lightning_robust.utils.modules import model_mode

__all__ = ["trace_model"]


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


def trace_model(model: nn.Module, x: torch.Tensor, tangent: torch.Tensor | None = None,
                track_lip: bool = False) -> tuple[Traced, TraceState]:
    """Run ``model`` (in eval mode) on ``x`` with tangents ``[B, T, *x.shape[1:]]``; return output and state.

    Raises:
        NotPiecewiseLinearError: on an operation without an exact piecewise-linear rule.
    """
    state = TraceState(track_tangent=tangent is not None, track_lip=track_lip)
    lip = torch.ones((), dtype=torch.float64, device=x.device) if track_lip else None
    inp = Traced(x, tangent, lip, state)
    with model_mode(model, "eval"), _module_stack(model, state):
        out = model(inp)
    if not isinstance(out, Traced):
        raise NotPiecewiseLinearError(
            f"the model returned {type(out).__name__}, not a tensor computed from its input; certificates "
            "need a net mapping an input batch to logits [B, K]")
    if out.value.ndim != 2:
        raise NotPiecewiseLinearError(
            f"the model's output must be logits of shape [B, K], got {tuple(out.value.shape)}")
    return out, state
