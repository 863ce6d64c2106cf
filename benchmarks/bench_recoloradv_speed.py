"""Cost of one ReColorAdv step against one PGD step (issue 25, item 1), side by side in one run.

A step's cost is the slope of the attack's time in its step count, ``(t(S) - t(s)) / (S - s)``, so the
fixed costs (start, keep-best bookkeeping, the final image) cancel. Both attacks run on the same model and
batch, interleaved repeat by repeat (medians), with the paper's settings for ReColorAdv (CIELUV, a
16 x 32 x 32 grid, Adam, smoothness 0.05, gamut projection) and PGD at L-inf 8/255. Two "before" variants
are timed beside it: the previous projection (the two float32 conversions, before the fused round trip) and
the previous smoothness penalty (its forward keeping the differences and norms, its backward building each
axis's weights and a zero-filled buffer). Times are process CPU seconds with one torch thread: the machine
is shared, and wall time would also count other jobs' time.

Targets: at most 3x a PGD step on the digits CNN, about 1x on a ResNet-18 at 32x32. A ReColorAdv step
also carries the colour grid (49k parameters per image at the paper's resolution) through Adam, the
projection and the smoothness penalty, whatever the image size: on 8x8 digits that grid is 250 times
the image, so there the grid's cost, not the network's, sets the ratio.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.common import markdown_table
from lightning_robust.attacks import PGD, ReColorAdv
from lightning_robust.attacks.color_spaces import cieluv_to_rgb, rgb_to_cieluv
from lightning_robust.attacks.recoloradv import grid_node_positions
from lightning_robust.nets import ResNet18, SmallCNN


class _TwoConversionProjection(ReColorAdv):
    """ReColorAdv with the projection as it was before the fused round trip (for the "before" row)."""

    def project_params(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nodes = grid_node_positions(params.shape[2:], params.device, params.dtype).unsqueeze(0)
        points = (nodes + params).clamp(0.0, 1.0)
        points = rgb_to_cieluv(cieluv_to_rgb(points, widen=False), widen=False)
        bounds = self._bounds(params)
        return torch.minimum(torch.maximum(points - nodes, -bounds), bounds)


class _PreviousSmoothness(torch.autograd.Function):
    """The smoothness penalty's forward and backward as they were before issue 25's second pass (for timing)."""

    @staticmethod
    def forward(ctx: Any, params: torch.Tensor, axes: tuple[int, ...], eps: float) -> torch.Tensor:
        total = params.new_zeros(params.shape[0])
        saved = []
        for axis in axes:
            d = params.diff(dim=axis)
            n = (d * d).sum(1, keepdim=True).add_(eps).sqrt_()
            total += n.flatten(1).sum(1)
            saved += [d, n]
        ctx.axes, ctx.shape = axes, params.shape
        ctx.save_for_backward(*saved)
        return 2 * total

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (g,) = grad_outputs
        saved = ctx.saved_tensors
        out = saved[0].new_zeros(ctx.shape)
        for i, axis in enumerate(ctx.axes):
            d, n = saved[2 * i], saved[2 * i + 1]
            w = d / n * (2 * g.view(-1, *([1] * (d.ndim - 1))))
            size = out.shape[axis]
            out.narrow(axis, 1, size - 1).add_(w)
            out.narrow(axis, 0, size - 1).sub_(w)
        return out, None, None


class _PreviousSmoothnessReColorAdv(ReColorAdv):
    """ReColorAdv with the previous smoothness penalty (for the "before" row)."""

    def regularizer(self, params: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = _PreviousSmoothness.apply(params, (2, 3, 4), 1e-10)
        return out


def _step_seconds(fns: dict[str, Callable[[int], object]], low: int, high: int, repeat: int) -> dict[str, float]:
    """Per-step CPU seconds of each ``fn(steps)``: median over repeats of ``(t(high) - t(low)) / (high - low)``."""
    slopes: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn(low)
    for _ in range(repeat):
        for name, fn in fns.items():  # interleaved, so load changes hit every attack alike
            t0 = time.process_time()
            fn(low)
            t1 = time.process_time()
            fn(high)
            t2 = time.process_time()
            slopes[name].append(((t2 - t1) - (t1 - t0)) / (high - low))
    return {k: statistics.median(v) for k, v in slopes.items()}


def _case(net: nn.Module, batch: int, size: int, low: int, high: int, repeat: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    net.eval()
    fns: dict[str, Callable[[int], object]] = {
        "PGD": lambda s: PGD(eps=8 / 255, alpha=2 / 255, steps=s)(net, x, y),
        "ReColorAdv": lambda s: ReColorAdv(steps=s)(net, x, y),
        "ReColorAdv, previous projection": lambda s: _TwoConversionProjection(steps=s)(net, x, y),
        "ReColorAdv, previous smoothness penalty": lambda s: _PreviousSmoothnessReColorAdv(steps=s)(net, x, y),
    }
    return _step_seconds(fns, low, high, repeat)


def run(quick: bool = False) -> str:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # (title, net, batch, image side, low and high step counts, repeats): ResNet-18 steps cost ~100x the
    # digits CNN's on one CPU thread, so that case takes fewer steps and repeats.
    cases = [
        ("SmallCNN, 8x8 digits", SmallCNN(in_channels=3, num_classes=10, input_size=8), 16 if quick else 64, 8,
         (2, 6, 1) if quick else (5, 25, 3)),
        ("ResNet-18, 32x32", ResNet18(num_classes=10), 4 if quick else 16, 32, (1, 3, 1) if quick else (2, 6, 2)),
    ]
    rows = []
    for title, net, batch, size, (low, high, repeat) in cases:
        t = _case(net, batch, size, low, high, repeat)
        for name in ("ReColorAdv", "ReColorAdv, previous projection", "ReColorAdv, previous smoothness penalty"):
            rows.append([title, batch, f"{low}/{high} x {repeat}", name, 1e3 * t["PGD"], 1e3 * t[name],
                         t[name] / t["PGD"]])
    return (
        "### ReColorAdv step cost vs a PGD step (paper settings, 1 torch thread, interleaved repeats)\n\n"
        + markdown_table(["model", "batch", "steps timed (low/high x repeats)", "attack", "PGD CPU ms/step",
                          "attack CPU ms/step", "ratio to PGD"], rows)
        + "\n\nTargets (issue 25): <= 3x on the digits CNN, ~1x on ResNet-18 at 32x32. Process CPU time, timed "
        "on a 2-core machine shared with other engineers' jobs: the ratios are side by side in one run, the "
        "absolute times are not comparable across runs."
    )
