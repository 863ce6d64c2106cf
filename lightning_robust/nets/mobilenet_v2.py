"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 input: the ARD paper's CIFAR-10 student."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.nets.normalize import make_normalize
from lightning_robust.utils.validation import check_positive, check_positive_int

__all__ = ["MobileNetV2"]

# (expansion t, output channels c, repeats n, stride s) from Table 2 of the paper, with the first two
# strides set to 1 for 32x32 input as in the common CIFAR adaptation (kuangliu/pytorch-cifar, ARD).
_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class _InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear bottleneck), residual when shapes match."""

    def __init__(self, inp: int, out: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = inp * expansion
        self.use_res = stride == 1 and inp == out
        self.block = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, out, 1, bias=False), nn.BatchNorm2d(out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 images (stride-1 stem), width multiplier as an argument.

    Args:
        num_classes: outputs.
        in_channels: input channels.
        width_mult: channel multiplier (1.0 = 2.2M parameters with 10 classes).
        mean, std: optional input normalization.

    Example:
        >>> MobileNetV2()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    feature_layer = "pool"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("num_classes", num_classes)
        check_positive("width_mult", width_mult)
        self.num_classes = num_classes
        self.normalize = make_normalize(mean, std)

        def ch(c: int) -> int:
            return max(8, round(c * width_mult / 8) * 8)

        stem = ch(32)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6()
        ]
        inp = stem
        for t, c, n, s in _CFG:
            for i in range(n):
                layers.append(_InvertedResidual(inp, ch(c), t, s if i == 0 else 1))
                inp = ch(c)
        last = ch(1280) if width_mult > 1.0 else 1280
        layers += [nn.Conv2d(inp, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(self.normalize(x))))
