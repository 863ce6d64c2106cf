"""Report and logging figures drawn with matplotlib (object API, Agg canvas: no pyplot state, no windows).

Every function returns a :class:`matplotlib.figure.Figure` laid out with ``constrained_layout`` (titles
and labels are never cut) and its legend outside the data area. Save one with :func:`save_figure` (or
``fig.savefig(path)``), turn it into an image tensor with :func:`figure_to_tensor`, or hand it to
:func:`~lightning_robust.utils.log_image`. Lines that coincide with an earlier series are drawn dashed
over it and say so in the legend, so no curve hides under another unannounced.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["bar_chart", "figure_to_tensor", "histogram", "image_grid", "line_plot", "save_figure", "scatter_plot"]

_GREEN, _RED = "#008c00", "#c80000"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":")


def _figure(width: float = 6.4, height: float = 3.6) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas: rendering never needs a display
    return fig


def _title(fig: Figure, title: str | None, fontsize: float = 11) -> None:
    """A figure title wrapped to the figure's width (constrained_layout makes room for it, never cuts it)."""
    if title:
        chars = max(16, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
        fig.suptitle(textwrap.fill(title, chars), fontsize=fontsize)


def _legend_outside(fig: Figure, ax: object) -> None:
    handles, labels = ax.get_legend_handles_labels()  # type: ignore[attr-defined]
    if handles:
        # Right of the axes (constrained_layout makes room), so the legend never covers data.
        fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False)


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def figure_to_tensor(fig: Figure) -> torch.Tensor:
    """The rendered figure as a ``[3, H, W]`` uint8 tensor (for loggers that take image arrays)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1)


def image_grid(
    images: torch.Tensor,
    captions: Sequence[str] | None = None,
    correct: Sequence[bool] | None = None,
    nrow: int = 8,
    cell: int = 64,
    title: str | None = None,
) -> Figure:
    """Tile ``images`` ([N, C, H, W] in [0, 1]) into a grid with one caption under each image.

    Args:
        images: the images; 1-channel images are shown in grey, pixels unsmoothed.
        captions: one short caption per image.
        correct: per image, colours its caption green (True) or red (False).
        nrow: images per row.
        cell: displayed side of each image in pixels.
        title: optional title above the grid.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    if captions is not None and len(captions) < len(images):
        raise ValueError(f"captions must have one entry per image ({len(images)}), got {len(captions)}")
    imgs = images.detach().float().cpu().clamp(0, 1)
    n = len(imgs)
    ncol = max(1, min(nrow, n))
    nrows = max(1, -(-n // ncol))
    side = cell / 100 + 0.05
    cap = 0.22 if captions is not None else 0.0
    fig = _figure(ncol * side + 0.2, nrows * (side + cap) + (0.35 if title else 0.1))
    axes = fig.subplots(nrows, ncol, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= n:
            continue
        img = imgs[i].permute(1, 2, 0).numpy()
        if img.shape[2] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        if captions is not None:
            colour = "black" if correct is None else (_GREEN if correct[i] else _RED)
            ax.set_title(str(captions[i]), fontsize=7, color=colour, pad=2, y=-0.01, va="top")
    _title(fig, title, 9)
    return fig


def _finite(values: torch.Tensor | Sequence[float]) -> np.ndarray:
    v = torch.as_tensor(values, dtype=torch.float64).flatten().numpy()
    return v[np.isfinite(v)]


def histogram(series: Mapping[str, torch.Tensor | Sequence[float]], bins: int = 30, title: str = "",
              xlabel: str = "", ylabel: str = "count", density: bool = False) -> Figure:
    """Histograms of one or more series on shared bins (outlines when several, so each stays visible).

    Non-finite values are dropped and each legend entry gives its series' count ``n``.
    """
    data = {k: _finite(v) for k, v in series.items()}
    nonempty = [v for v in data.values() if v.size]
    allv = np.concatenate(nonempty) if nonempty else np.zeros(1)
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1).tolist()
    fig = _figure()
    ax = fig.add_subplot()
    several = len(data) > 1
    for i, (name, v) in enumerate(data.items()):
        ax.hist(v, bins=edges, density=density, histtype="step" if several else "stepfilled",
                linewidth=1.8, linestyle=_LINESTYLES[i % len(_LINESTYLES)], label=f"{name} (n={v.size})")
    ax.set(xlabel=xlabel, ylabel="density" if density and ylabel == "count" else ylabel)
    _title(fig, title)
    _legend_outside(fig, ax)
    return fig


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
              xlabel: str = "", ylabel: str = "", ylim: tuple[float, float] | None = None,
              markers: bool = True) -> Figure:
    """Lines through ``(x, y)`` points, one per named series.

    A series equal to an earlier one is drawn dashed on top of it and labelled ``(= <earlier>)``.
    """
    fig = _figure()
    ax = fig.add_subplot()
    drawn: list[tuple[str, np.ndarray, np.ndarray]] = []
    for i, (name, (x, y)) in enumerate(series.items()):
        xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        same = next((n for n, px, py in drawn if px.shape == xa.shape and np.allclose(px, xa)
                     and np.allclose(py, ya, equal_nan=True)), None)
        label = name if same is None else f"{name} (= {same})"
        ax.plot(xa, ya, label=label, marker=_MARKERS[i % len(_MARKERS)] if markers else None, markersize=4,
                linestyle="--" if same is not None else _LINESTYLES[i % len(_LINESTYLES)], linewidth=1.6)
        drawn.append((name, xa, ya))
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _title(fig, title)
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    return fig


def scatter_plot(series: Mapping[str, torch.Tensor], title: str = "", xlabel: str = "", ylabel: str = "",
                 radius: float = 2.0) -> Figure:
    """Scatter of 2-D points ([n, 2] tensors), one colour and marker per named series."""
    fig = _figure(6.4, 4.8)
    ax = fig.add_subplot()
    for i, (name, pts) in enumerate(series.items()):
        p = torch.as_tensor(pts, dtype=torch.float64).reshape(-1, 2).numpy()
        ax.scatter(p[:, 0], p[:, 1], s=(2 * radius) ** 2, alpha=0.6, marker=_MARKERS[i % len(_MARKERS)],
                   label=f"{name} (n={len(p)})", linewidths=0)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    _title(fig, title)
    _legend_outside(fig, ax)
    return fig


def bar_chart(values: Mapping[str, float], title: str = "", ylabel: str = "",
              ylim: tuple[float, float] | None = None) -> Figure:
    """Vertical bars, one per named value, with the value printed above each bar."""
    names, vals = list(values), [float(v) for v in values.values()]
    fig = _figure(max(4.0, 0.9 * len(vals) + 1.5), 3.8)
    ax = fig.add_subplot()
    bars = ax.bar(range(len(vals)), vals, color=[f"C{i % 10}" for i in range(len(vals))])
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in vals], fontsize=8, padding=2)
    ax.set_xticks(range(len(vals)), names, rotation=30, ha="right", fontsize=8)
    if ylim is not None:
        ax.set_ylim(*ylim)
    else:
        top = max([*vals, 0.0])
        ax.set_ylim(min([*vals, 0.0]), top * 1.15 if top > 0 else 1.0)
    ax.set(ylabel=ylabel)
    _title(fig, title)
    return fig
