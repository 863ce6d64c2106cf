"""Small PNG figures drawn with Pillow (a torchvision dependency), so reports need no plotting library.

Image grids come from :func:`torchvision.utils.make_grid`; charts (histograms, lines, scatter, bars) are
drawn on a plain axes frame with ticks and a legend. All functions return a ``PIL.Image.Image``; call
``.save(path)`` to write a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid

__all__ = ["PALETTE", "bar_chart", "histogram", "image_grid", "line_plot", "scatter_plot"]

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
_GREEN, _RED, _BLACK, _GREY = (0, 140, 0), (200, 0, 0), (0, 0, 0), (200, 200, 200)


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _text_w(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def image_grid(
    images: torch.Tensor,
    captions: Sequence[str] | None = None,
    correct: Sequence[bool] | None = None,
    nrow: int = 8,
    cell: int = 64,
    title: str | None = None,
) -> Image.Image:
    """Tile ``images`` ([N, C, H, W] in [0, 1]) into a grid, each upscaled to ``cell`` px, with captions.

    Args:
        images: the images; 1-channel images are shown in grey.
        captions: one short caption per image, drawn under it.
        correct: per image, colours its caption green (True) or red (False).
        nrow: images per row.
        cell: displayed side of each image in pixels (nearest-neighbour upscaling keeps pixels visible).
        title: optional title line above the grid.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    imgs = images.detach().float().cpu().clamp(0, 1)
    if imgs.shape[1] == 1:
        imgs = imgs.repeat(1, 3, 1, 1)
    imgs = torch.nn.functional.interpolate(imgs, size=(cell, cell), mode="nearest")
    pad, cap_h = 4, (16 if captions is not None else 0)
    grid = make_grid(imgs, nrow=nrow, padding=pad, pad_value=1.0)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    body = Image.fromarray(arr)
    nrows = math.ceil(len(imgs) / nrow)
    top = 20 if title else 0
    out = Image.new("RGB", (body.width, body.height + nrows * cap_h + top), "white")
    draw = ImageDraw.Draw(out)
    font = _font(11)
    if title:
        draw.text((pad, 3), title, fill=_BLACK, font=_font(13))
    step = cell + pad
    for r in range(nrows):
        row = body.crop((0, r * step, body.width, (r + 1) * step + pad))
        out.paste(row, (0, top + r * (step + cap_h)))
    if captions is not None:
        for i, text in enumerate(captions[: len(imgs)]):
            r, c = divmod(i, nrow)
            colour = _BLACK if correct is None else (_GREEN if correct[i] else _RED)
            x = pad + c * step
            y = top + r * (step + cap_h) + step + 1
            draw.text((x, y), str(text)[: max(4, cell // 6)], fill=colour, font=font)
    return out


class _Axes:
    """A plain frame with linear axes, ticks and a legend; maps data coordinates to pixels."""

    def __init__(self, title: str, xlabel: str, ylabel: str, xlim: tuple[float, float],
                 ylim: tuple[float, float], size: tuple[int, int] = (560, 380)) -> None:
        self.img = Image.new("RGB", size, "white")
        self.draw = ImageDraw.Draw(self.img)
        self.font = _font(11)
        self.l, self.t, self.r, self.b = 62, 28, size[0] - 14, size[1] - 44
        x0, x1 = xlim
        y0, y1 = ylim
        if not x1 > x0:
            x0, x1 = x0 - 0.5, x0 + 0.5
        if not y1 > y0:
            y0, y1 = y0 - 0.5, y0 + 0.5
        self.xlim, self.ylim = (x0, x1), (y0, y1)
        d = self.draw
        d.rectangle((self.l, self.t, self.r, self.b), outline=_BLACK)
        d.text((self.l, 6), title, fill=_BLACK, font=_font(13))
        d.text(((self.l + self.r) // 2 - _text_w(d, xlabel, self.font) // 2, size[1] - 18), xlabel,
               fill=_BLACK, font=self.font)
        d.text((4, self.t - 16), ylabel, fill=_BLACK, font=self.font)
        for v in _ticks(x0, x1):
            px = self.px(v, y0)[0]
            d.line((px, self.b, px, self.b + 4), fill=_BLACK)
            label = _fmt(v)
            d.text((px - _text_w(d, label, self.font) // 2, self.b + 6), label, fill=_BLACK, font=self.font)
        for v in _ticks(y0, y1):
            py = self.px(x0, v)[1]
            d.line((self.l - 4, py, self.l, py), fill=_BLACK)
            d.line((self.l + 1, py, self.r - 1, py), fill=(235, 235, 235))
            label = _fmt(v)
            d.text((self.l - 8 - _text_w(d, label, self.font), py - 6), label, fill=_BLACK, font=self.font)
        self.legend: list[tuple[str, tuple[int, int, int]]] = []

    def px(self, x: float, y: float) -> tuple[float, float]:
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        return (self.l + (x - x0) / (x1 - x0) * (self.r - self.l), self.b - (y - y0) / (y1 - y0) * (self.b - self.t))

    def finish(self) -> Image.Image:
        y = self.t + 6
        if self.legend:  # a white box keeps the legend readable over the data
            w = max(_text_w(self.draw, name, self.font) for name, _ in self.legend)
            self.draw.rectangle((self.r - w - 30, y - 2, self.r - 4, y + 15 * len(self.legend)),
                                fill="white", outline=_GREY)
        for name, colour in self.legend:
            w = _text_w(self.draw, name, self.font)
            x = self.r - w - 26
            self.draw.rectangle((x, y + 2, x + 12, y + 10), fill=colour)
            self.draw.text((x + 16, y), name, fill=_BLACK, font=self.font)
            y += 15
        return self.img


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-9 * span:
        out.append(round(v, 12))
        v += step
    return out


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.3g}"


def _finite(values: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    return v[torch.isfinite(v)]


def histogram(series: Mapping[str, torch.Tensor | Sequence[float]], bins: int = 30, title: str = "",
              xlabel: str = "", ylabel: str = "count", density: bool = False) -> Image.Image:
    """Overlaid outline histograms of one or more series on shared bins."""
    data = {k: _finite(torch.as_tensor(v)) for k, v in series.items()}
    allv = torch.cat([v for v in data.values() if v.numel()] or [torch.zeros(1, dtype=torch.float64)])
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts = {}
    for k, v in data.items():
        c = torch.histc(v, bins=bins, min=lo, max=hi) if v.numel() else torch.zeros(bins, dtype=torch.float64)
        if density and v.numel():
            c = c / (v.numel() * (hi - lo) / bins)
        counts[k] = c
    top = max(float(c.max()) for c in counts.values()) * 1.1 or 1.0
    ax = _Axes(title, xlabel, ylabel, (lo, hi), (0.0, top))
    width = (hi - lo) / bins
    for i, (k, c) in enumerate(counts.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = []
        for j, h in enumerate(c.tolist()):
            x0p, y0p = ax.px(lo + j * width, 0)
            x1p, y1p = ax.px(lo + (j + 1) * width, h)
            if len(series) == 1:
                ax.draw.rectangle((x0p, y1p, x1p, y0p), fill=colour, outline="white")
            pts += [(x0p, y1p), (x1p, y1p)]
        if len(series) > 1 and pts:
            ax.draw.line(pts, fill=colour, width=2)
        ax.legend.append((f"{k} (n={data[k].numel()})", colour))
    return ax.finish()


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str = "",
              xlabel: str = "", ylabel: str = "", ylim: tuple[float, float] | None = None,
              markers: bool = True) -> Image.Image:
    """Lines through ``(x, y)`` points, one per named series."""
    xs = [float(v) for x, _ in series.values() for v in x]
    ys = [float(v) for _, y in series.values() for v in y if math.isfinite(float(v))]
    xlim = (min(xs, default=0.0), max(xs, default=1.0))
    if ylim is None:
        lo, hi = min(ys, default=0.0), max(ys, default=1.0)
        pad = 0.05 * (hi - lo or 1.0)
        ylim = (lo - pad, hi + pad)
    ax = _Axes(title, xlabel, ylabel, xlim, ylim)
    for i, (name, (x, y)) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = [ax.px(float(a), float(b)) for a, b in zip(x, y) if math.isfinite(float(b))]
        if len(pts) > 1:
            ax.draw.line(pts, fill=colour, width=2)
        if markers:
            for px, py in pts:
                ax.draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        ax.legend.append((name, colour))
    return ax.finish()


def scatter_plot(series: Mapping[str, torch.Tensor], title: str = "", xlabel: str = "", ylabel: str = "",
                 radius: float = 2.0) -> Image.Image:
    """Scatter of 2-D points ([n, 2] tensors), one colour per named series."""
    pts = {k: torch.as_tensor(v, dtype=torch.float64).reshape(-1, 2) for k, v in series.items()}
    allp = torch.cat([p for p in pts.values() if p.numel()] or [torch.zeros(1, 2, dtype=torch.float64)])
    lo, hi = allp.min(0).values, allp.max(0).values
    pad = 0.05 * (hi - lo).clamp_min(1e-9)
    ax = _Axes(title, xlabel, ylabel, (float(lo[0] - pad[0]), float(hi[0] + pad[0])),
               (float(lo[1] - pad[1]), float(hi[1] + pad[1])), size=(480, 440))
    for i, (name, p) in enumerate(pts.items()):
        colour = PALETTE[i % len(PALETTE)]
        for a, b in p.tolist():
            px, py = ax.px(a, b)
            ax.draw.ellipse((px - radius, py - radius, px + radius, py + radius), fill=colour)
        ax.legend.append((name, colour))
    return ax.finish()


def bar_chart(values: Mapping[str, float], title: str = "", ylabel: str = "",
              ylim: tuple[float, float] | None = None) -> Image.Image:
    """Vertical bars, one per named value, with the value printed above each bar."""
    names, vals = list(values), [float(v) for v in values.values()]
    top = max([*vals, 0.0])
    ylim = ylim or (min([*vals, 0.0]), top * 1.15 if top > 0 else 1.0)
    ax = _Axes(title, "", ylabel, (0.0, float(len(vals))), ylim)
    for i, (name, v) in enumerate(zip(names, vals)):
        colour = PALETTE[i % len(PALETTE)]
        x0, y0 = ax.px(i + 0.15, max(ylim[0], 0.0))
        x1, y1 = ax.px(i + 0.85, v)
        ax.draw.rectangle((x0, min(y0, y1), x1, max(y0, y1)), fill=colour)
        label = _fmt(v)
        ax.draw.text(((x0 + x1) / 2 - _text_w(ax.draw, label, ax.font) / 2, min(y0, y1) - 14), label,
                     fill=_BLACK, font=ax.font)
        ax.legend.append((name, colour))
    return ax.finish()
