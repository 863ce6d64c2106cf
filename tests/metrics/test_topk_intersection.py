"""TopKIntersection metric against brute-force set intersections."""

import pytest
import torch

from lightning_robust.metrics import TopKIntersection


def _brute(a, b, k):
    out = []
    for i in range(a.shape[0]):
        sa = set(a[i].flatten().abs().argsort(descending=True)[:k].tolist())
        sb = set(b[i].flatten().abs().argsort(descending=True)[:k].tolist())
        out.append(len(sa & sb) / k)
    return out


def test_accumulates_mean_overlap_over_batches():
    g = torch.Generator().manual_seed(0)
    metric = TopKIntersection(k_fraction=0.25)
    all_vals = []
    for n in (3, 5, 1):
        a = torch.randn(n, 1, 8, 8, generator=g)
        b = a + 0.8 * torch.randn(n, 1, 8, 8, generator=g)
        metric.update(a, b)
        all_vals += _brute(a, b, 16)
    assert metric.compute().item() == pytest.approx(sum(all_vals) / len(all_vals), abs=1e-6)
    metric.reset()
    a = torch.randn(4, 10, generator=g)
    assert TopKIntersection(k=3)(a, a).item() == 1.0
    assert TopKIntersection(k=3, absolute=False)(a, -a).item() < 1.0  # signed ranking differs


def test_errors():
    with pytest.raises(ValueError, match="k must be a positive integer, got 0"):
        TopKIntersection(k=0)
    with pytest.raises(ValueError, match=r"k_fraction must lie in \(0, 1\], got 0"):
        TopKIntersection(k_fraction=0.0)
    with pytest.raises(ValueError, match="must have the same shape"):
        TopKIntersection().update(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"k must be an integer in \(0, 4\]"):
        TopKIntersection(k=5).update(torch.zeros(2, 4), torch.zeros(2, 4))
