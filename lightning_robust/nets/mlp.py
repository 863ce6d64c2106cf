"""A fully connected ReLU network: the standard object of ReLU-network certification papers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.nets.normalize import make_normalize
from lightning_robust.utils.validation import check_positive_int

__all__ = ["MLP"]


class MLP(nn.Module):
    """``Flatten -> [Linear -> ReLU] * len(hidden) -> Linear``.

    Layers live in ``self.layers`` (an ``nn.Sequential``), so the penultimate activation is
    ``layers.{2 * len(hidden)}`` (``MLP.feature_layer`` for the default two hidden layers is resolved per
    instance as ``self.feature_layer``).

    Args:
        in_features: flattened input size (e.g. 784 for MNIST, 64 for the bundled 8x8 digits, 2 for toy data).
        num_classes: number of outputs.
        hidden: widths of the hidden layers (may be empty: a linear model).
        mean, std: optional input normalization (a single statistic for all features).

    Raises:
        ValueError: on non-positive sizes.

    Example:
        >>> net = MLP(in_features=64, num_classes=10, hidden=(128, 128))
        >>> net(torch.rand(5, 1, 8, 8)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        in_features: int = 784,
        num_classes: int = 10,
        hidden: Sequence[int] = (256, 256),
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_features", in_features)
        check_positive_int("num_classes", num_classes)
        for i, h in enumerate(hidden):
            check_positive_int(f"hidden[{i}]", h)
        self.in_features, self.num_classes = in_features, num_classes
        self.normalize = make_normalize(mean, std)
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)
        self.feature_layer = f"layers.{2 * len(hidden)}" if hidden else "layers.0"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if x.flatten(1).shape[1] != self.in_features:
            raise ValueError(f"MLP expects {self.in_features} input features per sample, "
                             f"got input of shape {tuple(x.shape)}")
        return self.layers(x)
