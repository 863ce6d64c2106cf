"""Ground costs between two sets of samples, and the normalizer of the density ``C exp(-cost / reg)``.

The entropic GAN of Balaji et al. (arXiv 1810.04147) ties its cost ``ℓ`` to an explicit observation model
``f(y | x) = C exp(-ℓ(y, G(x)) / λ)``: the squared Euclidean cost gives a Gaussian ``N(G(x), (λ/2) I)``, the
L1 cost a Laplace density with scale ``λ`` per coordinate. :func:`cost_log_normalizer` returns ``log C``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lightning_robust.utils.validation import check_choice, check_finite, check_positive, check_positive_int

__all__ = ["COSTS", "CostFn", "cost_log_normalizer", "pairwise_cost", "resolve_cost"]

#: Built-in costs: ``"l2"`` is the *squared* Euclidean distance, ``"l1"`` the sum of absolute differences.
COSTS = ("l1", "l2")

CostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, cost: str = "l2") -> torch.Tensor:
    """Cost matrix ``C[i, j] = ℓ(x_i, y_j)`` between ``x`` ([n, ...]) and ``y`` ([m, ...]), flattened per sample.

    ``"l2"``: ``||x_i - y_j||_2^2`` (expanded as ``|x|^2 + |y|^2 - 2 x.y`` and clamped at 0, so it costs one
    matrix product); ``"l1"``: ``||x_i - y_j||_1`` (the authors' MNIST cost).

    Raises:
        ValueError: on an unknown cost or samples of different sizes.

    Example:
        >>> C = pairwise_cost(torch.randn(5, 2), torch.randn(7, 2), "l1")  # [5, 7]
    """
    check_finite("x", x)
    check_finite("y", y)
    check_choice("cost", cost, COSTS)
    if x.ndim < 1 or y.ndim < 1:
        raise ValueError(f"x and y must have a leading sample dimension, got shapes {tuple(x.shape)}, {tuple(y.shape)}")
    xf, yf = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if xf.shape[1] != yf.shape[1]:
        raise ValueError(f"x and y must have the same number of features per sample, got {xf.shape[1]} and "
                         f"{yf.shape[1]} (shapes {tuple(x.shape)} and {tuple(y.shape)})")
    if cost == "l1":
        return torch.cdist(xf, yf, p=1.0)
    sq = (xf * xf).sum(1, keepdim=True) + (yf * yf).sum(1)[None, :] - 2.0 * (xf @ yf.T)
    return sq.clamp_min(0.0)


def resolve_cost(cost: str | CostFn) -> CostFn:
    """A pairwise cost function from a name in :data:`COSTS` or a callable ``(x [n, ...], y [m, ...]) -> [n, m]``."""
    if callable(cost):
        return cost
    check_choice("cost", cost, COSTS)

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return pairwise_cost(x, y, cost)

    return fn


def cost_log_normalizer(cost: str, dim: int, reg: float) -> float:
    """``log C`` such that ``y -> C exp(-ℓ(y, ŷ) / reg)`` integrates to one over ``R^dim``.

    ``"l2"`` (squared Euclidean): ``∫ exp(-|u|^2 / λ) du = (π λ)^{d/2}``, so ``log C = -(d/2) log(π λ)``.
    ``"l1"``: ``∫ exp(-|u|_1 / λ) du = (2 λ)^d``, so ``log C = -d log(2 λ)``.

    Raises:
        ValueError: on an unknown cost, ``dim < 1`` or ``reg <= 0``.
    """
    check_choice("cost", cost, COSTS)
    check_positive_int("dim", dim)
    check_positive("reg", reg)
    if cost == "l2":
        return -0.5 * dim * math.log(math.pi * reg)
    return -dim * math.log(2.0 * reg)
