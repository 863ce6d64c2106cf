"""The two critics (dual potentials) of an entropic optimal-transport GAN, optionally on a shared trunk."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DualCritic"]


class DualCritic(nn.Module):
    """Dual potentials ``D1`` (on real samples) and ``D2`` (on generated samples) of entropic OT.

    Balaji et al., "Entropic GANs meet VAEs" (arXiv 1810.04147) maximize
    ``E[D1(Y)] - E[D2(Ŷ)] - λ E_{Y⊗Ŷ}[exp((D1(y) - D2(ŷ) - ℓ(y, ŷ)) / λ - 1)]`` over two critics. In the
    authors' code both share the convolutional layers and differ only in their last linear layer (the
    real-side head has no bias: the pair is defined up to one common constant). Pass ``trunk`` for that
    layout (``real`` and ``fake`` are then the heads on the trunk's features), or two full nets and no trunk.

    Args:
        real: ``D1``: maps a sample (or trunk features) to one score per sample.
        fake: ``D2``: likewise, for generated samples.
        trunk: optional shared feature extractor applied before both heads.

    Example:
        >>> trunk = nn.Sequential(nn.Flatten(), nn.Linear(2, 64), nn.LeakyReLU(0.2))
        >>> critic = DualCritic(nn.Linear(64, 1, bias=False), nn.Linear(64, 1), trunk=trunk)
        >>> critic.real_potential(torch.randn(5, 2)).shape
        torch.Size([5])
    """

    def __init__(self, real: nn.Module, fake: nn.Module, trunk: nn.Module | None = None) -> None:
        super().__init__()
        for name, mod in (("real", real), ("fake", fake), ("trunk", trunk)):
            if mod is not None and not isinstance(mod, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(mod).__name__}")
        self.trunk = trunk
        self.real = real
        self.fake = fake

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.trunk is None else self.trunk(x)

    def real_potential(self, y: torch.Tensor) -> torch.Tensor:
        """``D1(y)``, shape [B]."""
        return self.real(self._features(y)).reshape(y.shape[0])

    def fake_potential(self, y_hat: torch.Tensor) -> torch.Tensor:
        """``D2(ŷ)``, shape [B]."""
        return self.fake(self._features(y_hat)).reshape(y_hat.shape[0])

    def forward(self, y: torch.Tensor, y_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D1(y), D2(ŷ))``."""
        return self.real_potential(y), self.fake_potential(y_hat)
