"""matplotlib figures of reports and loggers: readable (legend outside the data, titles inside the figure)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from lightning_robust.utils.plotting import (
    bar_chart,
    figure_to_tensor,
    histogram,
    image_grid,
    line_plot,
    save_figure,
    scatter_plot,
)


def _extents(fig: Figure):
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return renderer, fig.bbox


def _assert_readable(fig: Figure) -> None:
    """Every text inside the figure (nothing cut) and the legend clear of every axes' data area."""
    renderer, bbox = _extents(fig)
    texts = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()]
    texts += [t for t in fig.texts if t.get_text()]
    if fig._suptitle is not None:
        texts.append(fig._suptitle)
    for t in texts:
        ext = t.get_window_extent(renderer)
        assert ext.x0 >= bbox.x0 - 1 and ext.x1 <= bbox.x1 + 1 and ext.y0 >= bbox.y0 - 1 and ext.y1 <= bbox.y1 + 1, \
            t.get_text()
    for legend in fig.legends:
        lext = legend.get_window_extent(renderer)
        assert lext.x1 <= bbox.x1 + 1
        for ax in fig.axes:
            assert not lext.overlaps(ax.get_window_extent(renderer)), "legend covers the data"


def test_charts_are_readable_and_render_to_png(tmp_path) -> None:
    long_title = "Certified accuracy against the L2 radius, decision-boundary and simplex certificates"
    figs = {
        "hist": histogram({"a": torch.randn(200), "b with a long series name": torch.randn(100) + 1}, title=long_title),
        "line": line_plot({"x": ([0, 1, 2], [0.1, 0.5, 0.4]), "y": ([0, 1, 2], [0.3, 0.2, 0.1])}, title=long_title,
                          xlabel="radius", ylabel="accuracy"),
        "scatter": scatter_plot({"data": torch.randn(50, 2), "gen": torch.randn(50, 2)}, title=long_title),
        "bar": bar_chart({"clean": 0.95, "PGD-20 (linf 0.1)": 0.41}, title=long_title, ylabel="accuracy"),
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure)
        _assert_readable(fig)
        path = save_figure(fig, tmp_path / "sub" / f"{name}.png")
        with Image.open(path) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # object API only: no pyplot figure (and no window) was opened


def test_a_line_equal_to_an_earlier_one_is_announced() -> None:
    fig = line_plot({"simplex": ([0, 1], [1.0, 0.5]), "decision boundary": ([0, 1], [1.0, 0.5]),
                     "other": ([0, 1], [0.9, 0.2])})
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["simplex", "decision boundary (= simplex)", "other"]
    assert fig.axes[0].lines[1].get_linestyle() == "--"


def test_histogram_drops_non_finite_values_and_counts_what_it_shows() -> None:
    fig = histogram({"r": torch.tensor([0.1, 0.2, float("inf"), float("nan"), 0.3])}, bins=3)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["r (n=3)"]
    (patch,) = fig.axes[0].patches  # one series: a filled step outline over the 3 bins
    assert patch.get_xy()[:, 1].max() == 1.0  # 0.1, 0.2, 0.3: one finite value per bin


def test_image_grid_shows_the_pixels_and_colours_captions() -> None:
    images = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    fig = image_grid(images, captions=[str(i) for i in range(5)], correct=[True, False, True, True, False], nrow=3)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 5
    np.testing.assert_allclose(shown[1].images[0].get_array(), images[1, 0].numpy(), rtol=0, atol=1e-7)
    assert shown[1].title.get_color() != shown[0].title.get_color()
    with pytest.raises(ValueError, match=r"images must be \[N, C, H, W\]"):
        image_grid(images[0])
    with pytest.raises(ValueError, match="captions must have one entry per image"):
        image_grid(images, captions=["a"])


def test_figure_to_tensor_is_the_saved_png(tmp_path) -> None:
    fig = bar_chart({"a": 1.0, "b": 2.0})
    t = figure_to_tensor(fig)
    assert t.dtype == torch.uint8 and t.shape[0] == 3
    with Image.open(save_figure(fig, tmp_path / "f.png")) as im:
        png = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    assert png.shape == t.shape
    assert (png.int() - t.int()).abs().float().mean() < 1.0
