"""Input normalization as a layer, so that attacks and certificates work in pixel space."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Normalize", "make_normalize"]


class Normalize(nn.Module):
    """Per-channel affine normalization ``(x - mean) / std`` as the first layer of a net.

    Keeping normalization inside the net means every attack, saliency method and certificate in the
    library sees images in [0, 1] and budgets are stated in pixel units (the usual convention of
    RobustBench and torchattacks). The map is affine, so ReLU-net certificates stay exact.

    Args:
        mean: per-channel means (length = number of channels, or 1 to broadcast).
        std: per-channel standard deviations, all > 0.

    Raises:
        ValueError: if lengths differ or a std is not positive.

    Example:
        >>> norm = Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        >>> norm(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or len(mean) == 0:
            raise ValueError(f"mean and std must be non-empty and of equal length, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # flattened input (MLPs): broadcast a single channel statistic
            return (x - self.mean.view(1, -1)[:, :1]) / self.std.view(1, -1)[:, :1]
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def make_normalize(mean: Sequence[float] | None, std: Sequence[float] | None) -> nn.Module:
    """Return ``Normalize(mean, std)``, or ``nn.Identity()`` when both are ``None``."""
    if mean is None and std is None:
        return nn.Identity()
    if mean is None or std is None:
        raise ValueError("mean and std must be given together (or both left as None)")
    return Normalize(mean, std)
