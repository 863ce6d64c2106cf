"""Top-k intersection of saliency maps, the robustness measure of interpretations (arXiv 1905.12105)."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from lightning_robust.interpret.saliency import topk_intersection
from lightning_robust.utils.validation import check_finite, check_fraction, check_positive_int

__all__ = ["TopKIntersection"]


class TopKIntersection(Metric):
    """Mean fraction of the top-k entries of one saliency map that are also top-k in another.

    ``update(saliency, other)`` takes two batches of maps of the same shape (e.g. of natural and attacked
    inputs); ``compute()`` returns ``mean_b |top_k(saliency_b) ∩ top_k(other_b)| / k`` over every map seen,
    synchronised across processes. Ranking is by magnitude unless ``absolute=False``.

    Args:
        k: size of the top set; default ``max(1, ⌊k_fraction · d⌋)`` for maps of ``d`` entries.
        k_fraction: used when ``k`` is None, in (0, 1] (the paper reports the top-25% overlap on MNIST).
        absolute: rank entries by ``|value|``.

    Raises:
        ValueError: on a non-positive ``k``, a fraction outside (0, 1], maps of different shapes, or ``k``
            larger than the number of entries.

    Example:
        >>> metric = TopKIntersection(k_fraction=0.25)
        >>> metric.update(gradient_saliency(net, x), gradient_saliency(net, x_adv))
        >>> metric.compute()
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, k: int | None = None, k_fraction: float = 0.25, absolute: bool = True) -> None:
        super().__init__()
        if k is not None:
            check_positive_int("k", k)
        check_fraction("k_fraction", k_fraction, inclusive_low=False, inclusive_high=True)
        self.k = k
        self.k_fraction = float(k_fraction)
        self.absolute = bool(absolute)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def num_top(self, d: int) -> int:
        """The ``k`` used for maps with ``d`` entries."""
        return self.k if self.k is not None else max(1, int(self.k_fraction * d))

    def update(self, saliency: torch.Tensor, other: torch.Tensor) -> None:
        check_finite("saliency", saliency)
        check_finite("other", other)
        if saliency.shape != other.shape:
            raise ValueError(f"saliency and other must have the same shape, got {tuple(saliency.shape)} "
                             f"and {tuple(other.shape)}")
        k = self.num_top(saliency[0].numel())
        inter = topk_intersection(saliency.detach(), other.detach(), k, self.absolute)
        self.total += inter.double().sum().to(self.total.device) / k
        self.count += inter.numel()

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp_min(1)).float()
