"""The affine generator of the Normalized-Wasserstein paper's mixture-of-Gaussians experiment."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.utils.validation import check_positive, check_positive_int

__all__ = ["LinearGenerator"]


class LinearGenerator(nn.Module):
    """A stack of linear layers without activations: an affine map, so ``G(z)`` is Gaussian for Gaussian ``z``.

    The generator of each mixture component in the NW-GAN mixture-of-Gaussians experiment (Balaji et al.,
    arXiv 1902.00415; the authors' ``NetG``: 2 -> 64 -> 64 -> 64 -> 2 linear layers). Their latents are
    ``N(0, 0.1^2 I)``; here latents are standard normal and multiplied by ``latent_scale`` (0.1) first,
    which is the same model and keeps the components compact at the start of training, so that
    gradient steps move a component's mean much faster than its covariance.

    Args:
        latent_dim: size of ``z``.
        out_features: size of the samples.
        hidden: widths of the intermediate linear layers (may be empty: one linear layer).
        latent_scale: factor applied to ``z``.

    Raises:
        ValueError: on non-positive sizes or scale.

    Example:
        >>> g = LinearGenerator(latent_dim=2, out_features=2)
        >>> g(torch.randn(5, 2)).shape
        torch.Size([5, 2])
    """

    def __init__(self, latent_dim: int = 2, out_features: int = 2, hidden: Sequence[int] = (64, 64, 64),
                 latent_scale: float = 0.1) -> None:
        super().__init__()
        check_positive_int("latent_dim", latent_dim)
        check_positive_int("out_features", out_features)
        for i, h in enumerate(hidden):
            check_positive_int(f"hidden[{i}]", h)
        self.latent_dim, self.out_features = latent_dim, out_features
        self.latent_scale = check_positive("latent_scale", latent_scale)
        widths = [latent_dim, *hidden, out_features]
        self.layers = nn.Sequential(*(nn.Linear(a, b) for a, b in itertools.pairwise(widths)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z.flatten(1) * self.latent_scale)

    @torch.no_grad()
    def affine_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, b)`` with ``G(z) = A z + b``: the component is ``N(b, A Aᵀ)`` for standard normal ``z``."""
        first = self.layers[0]
        assert isinstance(first, nn.Linear)
        eye = torch.eye(self.latent_dim, device=first.weight.device)
        b = self.forward(torch.zeros(1, self.latent_dim, device=eye.device))[0]
        a = (self.forward(eye) - b).T
        return a, b
