"""A fully connected generator: latent vector -> sample of a given shape (toy 2-D data, small images)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.utils.validation import check_choice, check_positive_int

__all__ = ["MLPGenerator"]


class MLPGenerator(nn.Module):
    """``z [B, latent_dim] -> [Linear -> ReLU] * len(hidden) -> Linear -> output -> reshape to out_shape``.

    Args:
        latent_dim: latent size (exposed as ``latent_dim`` for the GAN modules).
        out_shape: shape of one sample, e.g. ``(2,)`` for 2-D points or ``(1, 8, 8)`` for 8x8 digits.
        hidden: hidden widths.
        output: ``"linear"`` (unbounded samples), ``"sigmoid"`` (pixels in [0, 1]) or ``"tanh"``.

    Raises:
        ValueError: on non-positive sizes or an unknown output.

    Example:
        >>> MLPGenerator(latent_dim=8, out_shape=(1, 8, 8), output="sigmoid")(torch.randn(3, 8)).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(self, latent_dim: int = 2, out_shape: Sequence[int] = (2,), hidden: Sequence[int] = (128, 128),
                 output: str = "linear") -> None:
        super().__init__()
        check_positive_int("latent_dim", latent_dim)
        for i, s in enumerate(out_shape):
            check_positive_int(f"out_shape[{i}]", s)
        for i, h in enumerate(hidden):
            check_positive_int(f"hidden[{i}]", h)
        check_choice("output", output, ("linear", "sigmoid", "tanh"))
        self.latent_dim = latent_dim
        self.out_shape = tuple(out_shape)
        layers: list[nn.Module] = []
        width = latent_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, int(torch.Size(self.out_shape).numel())))
        if output == "sigmoid":
            layers.append(nn.Sigmoid())
        elif output == "tanh":
            layers.append(nn.Tanh())
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z.reshape(z.shape[0], -1)).reshape(z.shape[0], *self.out_shape)
