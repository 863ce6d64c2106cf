"""The MNIST-style CNN used across the robustness literature, adapted to 8x8, 28x28 and 32x32 input."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.nets.normalize import make_normalize
from lightning_robust.utils.validation import check_choice, check_positive_int

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Four 3x3 convolutions and a three-layer head (the "SmallCNN" of TRADES / Madry's MNIST model).

    ``conv32-conv32-pool-conv64-conv64-pool-fc200-fc200-fc``, every activation an ``nn.ReLU`` module so
    the net is piecewise linear (certificates apply) and every layer is addressable by a dotted name
    (``features.*``, ``classifier.*``) for :class:`~lightning_robust.utils.FeatureExtractor`. The
    penultimate activation is ``classifier.3`` (also available as ``SmallCNN.feature_layer``).

    Args:
        in_channels: 1 (grey) or 3 (colour).
        num_classes: number of outputs.
        input_size: side of the square input: 8 (bundled digits), 28 (MNIST) or 32 (CIFAR / padded MNIST).
        width: multiplies all channel and hidden widths (``width=2`` doubles them).
        pool: ``"max"`` (the classic model) or ``"avg"`` (keeps the net linear inside a ReLU region, which
            tightens some certificates).
        mean, std: optional input normalization, applied as the first layer.

    Raises:
        ValueError: on a non-positive size, an ``input_size`` not divisible by 4, or an unknown ``pool``.

    Example:
        >>> net = SmallCNN(in_channels=1, num_classes=10, input_size=8)
        >>> net(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """

    feature_layer = "classifier.3"

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        input_size: int = 28,
        width: int = 1,
        pool: str = "max",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("num_classes", num_classes)
        check_positive_int("width", width)
        check_choice("pool", pool, ("max", "avg"))
        if not isinstance(input_size, int) or input_size < 4 or input_size % 4:
            raise ValueError(f"input_size must be a positive multiple of 4 (8, 28, 32, ...), got {input_size!r}")
        self.in_channels, self.num_classes, self.input_size = in_channels, num_classes, input_size
        c1, c2, h = 32 * width, 64 * width, 200 * width
        pool_layer = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
        self.normalize = make_normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
            pool_layer(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
            pool_layer(2),
            nn.Flatten(),
        )
        flat = c2 * (input_size // 4) ** 2
        self.classifier = nn.Sequential(
            nn.Linear(flat, h), nn.ReLU(),
            nn.Linear(h, h), nn.ReLU(),
            nn.Linear(h, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))
