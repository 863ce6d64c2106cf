"""Threat models: the set of allowed perturbations around an input, and the projection onto it."""

from __future__ import annotations

import torch

from lightning_robust.utils.validation import check_choice, check_non_negative

__all__ = ["NORMS", "ThreatModel"]

NORMS = ("linf", "l2", "l1", "none")


def _batch_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    flat = v.flatten(1)
    if norm == "linf":
        return flat.abs().amax(1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    return flat.abs().sum(1)


def _view(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.view(-1, *([1] * (like.ndim - 1)))


class ThreatModel:
    """An L-p ball of radius ``eps`` around the clean input, intersected with the box ``[low, high]``.

    ``norm="none"`` is the box alone (used by functional threat models such as ReColorAdv, whose budget
    lives on their own parameters).

    Args:
        norm: ``"linf"``, ``"l2"``, ``"l1"`` or ``"none"``.
        eps: radius of the ball (>= 0), in pixel units of [0, 1] images.
        low, high: value bounds of valid inputs.

    Raises:
        ValueError: on an unknown norm, a negative eps or empty bounds.

    Example:
        >>> tm = ThreatModel("linf", 8 / 255)
        >>> x_adv = tm.project(x + 0.1 * torch.randn_like(x), x)
        >>> bool(tm.contains(x_adv, x).all())
        True
    """

    def __init__(self, norm: str = "linf", eps: float = 8 / 255, low: float = 0.0, high: float = 1.0) -> None:
        self.norm = check_choice("norm", norm, NORMS)
        self.eps = float(check_non_negative("eps", eps))
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
            raise ValueError(f"low must be smaller than high, got low={low!r}, high={high!r}")
        self.low, self.high = float(low), float(high)

    def __repr__(self) -> str:
        return f"ThreatModel(norm={self.norm!r}, eps={self.eps:.6g}, low={self.low}, high={self.high})"

    def distance(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample distance ``||x_adv - x||`` in this threat model's norm ([B]; 0 for ``"none"``)."""
        if self.norm == "none":
            return torch.zeros(x.shape[0], device=x.device, dtype=x.dtype)
        return _batch_norm(x_adv - x, self.norm)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Nearest point (for linf/l2; a radial shrink for l1) of the ball around ``x``, then clipped to the box.

        For ``linf`` the result is the exact Euclidean projection onto ball ∩ box (both are boxes). For
        ``l2`` it is the usual PGD projection (radial shrink, then clip); clipping never increases the
        distance to ``x`` (``x`` is inside the box), so the result stays in the ball.
        """
        return (x + self.project_delta(x_adv - x)).clamp(self.low, self.high)

    def project_delta(self, delta: torch.Tensor) -> torch.Tensor:
        """The ball part of :meth:`project` alone: clip (linf) or shrink radially (l2, l1) ``delta``."""
        if self.norm == "linf":
            return delta.clamp(-self.eps, self.eps)
        if self.norm in ("l2", "l1"):
            n = _batch_norm(delta, self.norm)
            factor = torch.where(n > self.eps, self.eps / n.clamp_min(1e-12), torch.ones_like(n))
            return delta * _view(factor, delta)
        return delta

    def contains(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per-sample boolean: ``x_adv`` within the box and within ``eps`` (+ ``tol``) of ``x``."""
        in_box = ((x_adv >= self.low - tol) & (x_adv <= self.high + tol)).flatten(1).all(1)
        if self.norm == "none":
            return in_box
        return in_box & (self.distance(x_adv, x) <= self.eps + tol)

    def random_start(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random point of the threat model around ``x``.

        linf: uniform in the cube (Madry et al.); l2/l1: a uniformly random direction scaled by a uniform
        radius in [0, eps] (the torchattacks / robustness-library convention).
        """
        if self.norm == "none" or self.eps == 0:
            return x.clone()
        if self.norm == "linf":
            u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            delta = (2 * u - 1) * self.eps
        else:
            d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if self.norm == "l1":
                d = d.sign() * torch.empty_like(d).exponential_(generator=generator)
            n = _batch_norm(d, self.norm).clamp_min(1e-12)
            r = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype)
            delta = d * _view(r * self.eps / n, d)
        return self.project(x + delta, x)
