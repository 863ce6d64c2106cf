"""Certified accuracy at a list of L2 radii, synchronised across processes (torchmetrics)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from lightning_robust.utils.validation import check_finite, check_non_negative

__all__ = ["CertifiedAccuracy", "certified_accuracy"]


def certified_accuracy(radius: torch.Tensor, correct: torch.Tensor, radii: Sequence[float] | torch.Tensor
                       ) -> torch.Tensor:
    """Fraction of samples that are correctly classified with a certificate covering each radius.

    A sample counts at radius ``eps`` when it is correct and ``radius > eps`` (certificates promise no
    change strictly inside the radius); at ``eps = 0`` every correct sample counts, so the first entry of
    ``radii = (0, ...)`` is the clean accuracy.

    Args:
        radius: ``[N]`` certified radii.
        correct: ``[N]`` bool, whether the prediction equals the label.
        radii: the radii to report.

    Returns:
        ``[R]`` float tensor (NaN-free; 0 for an empty batch).
    """
    check_finite("radius", radius, allow_posinf=True)
    eps = torch.as_tensor(radii, dtype=radius.dtype if radius.is_floating_point() else torch.float32,
                          device=radius.device).reshape(-1, 1)
    ok = correct.reshape(1, -1).bool() & ((radius.reshape(1, -1) > eps) | (eps == 0))
    return ok.float().mean(1) if radius.numel() else torch.zeros(eps.shape[0], device=radius.device)


class CertifiedAccuracy(Metric):
    """Certified accuracy at each of ``radii``, with states summed over processes.

    ``update(radius, preds, target)`` takes per-sample certified radii (of the predicted class) with the
    predictions and labels; ``compute()`` returns a ``[R]`` tensor: the fraction of all samples seen (on
    all processes) that are correct with ``radius > eps`` (``eps = 0``: plain accuracy). The states are
    sums, so the result is independent of how samples are split between processes.

    Args:
        radii: non-negative radii at which to report certified accuracy (default ``(0, 0.1, 0.25, 0.5)``).

    Raises:
        ValueError: if ``radii`` is empty or holds a negative or non-finite value.

    Example:
        >>> metric = CertifiedAccuracy(radii=(0.0, 0.5))
        >>> metric.update(torch.tensor([0.7, 0.2, 0.9]), torch.tensor([1, 2, 0]), torch.tensor([1, 2, 1]))
        >>> metric.compute()
        tensor([0.6667, 0.3333])
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    certified: torch.Tensor
    total: torch.Tensor

    def __init__(self, radii: Sequence[float] = (0.0, 0.1, 0.25, 0.5)) -> None:
        super().__init__()
        radii = list(radii)
        if not radii:
            raise ValueError("radii must hold at least one radius, got an empty sequence")
        for i, r in enumerate(radii):
            check_non_negative(f"radii[{i}]", r)
        self.radii = [float(r) for r in radii]
        self.add_state("certified", default=torch.zeros(len(self.radii), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, radius: torch.Tensor, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``radius`` [N] certified radii, ``preds`` [N] predicted classes, ``target`` [N] labels."""
        check_finite("radius", radius, allow_posinf=True)
        radius = radius.detach().reshape(-1).to(torch.float64)
        if preds.shape != target.shape or preds.numel() != radius.numel():
            raise ValueError(f"radius, preds and target must have the same number of elements, got "
                             f"{radius.numel()}, {tuple(preds.shape)} and {tuple(target.shape)}")
        correct = preds.reshape(-1) == target.reshape(-1)
        frac = certified_accuracy(radius, correct, self.radii)
        self.certified += frac.to(torch.float64) * radius.numel()
        self.total += radius.numel()

    def compute(self) -> torch.Tensor:
        """``[R]`` certified accuracy at each radius (0 before any update; torchmetrics squeezes ``R = 1``)."""
        return (self.certified / self.total.clamp_min(1)).float()
