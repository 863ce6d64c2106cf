"""WideResNet (Zagoruyko & Komodakis 2016), the WRN-34-10 of Madry et al. / TRADES / ARD teachers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.nets.normalize import make_normalize
from lightning_robust.utils.validation import check_fraction, check_positive_int

__all__ = ["WideResNet"]


class _WideBlock(nn.Module):
    """Pre-activation block: ``BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3`` plus shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.equal = in_planes == planes and stride == 1
        self.shortcut = (
            nn.Identity() if self.equal else nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.relu1(self.bn1(x))
        # As in the reference implementation, a projection shortcut reads the pre-activated input.
        short = x if self.equal else self.shortcut(o)
        out = self.conv2(self.dropout(self.relu2(self.bn2(self.conv1(o)))))
        return out + short


class WideResNet(nn.Module):
    """WRN-depth-k: three groups of ``(depth - 4) / 6`` wide pre-activation blocks (16k, 32k, 64k channels).

    Args:
        depth: total depth, ``6n + 4`` (34 gives 5 blocks per group, as in Madry et al.'s WRN-34-10).
        widen_factor: channel multiplier k (10 for WRN-34-10).
        num_classes: outputs.
        in_channels: input channels.
        dropout: dropout rate inside blocks.
        mean, std: optional input normalization.

    Raises:
        ValueError: if ``depth`` is not of the form 6n + 4 or sizes are not positive.

    Example:
        >>> WideResNet(depth=10, widen_factor=1)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    feature_layer = "pool"

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        if not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be of the form 6n + 4 with n >= 1 (e.g. 28, 34), got {depth!r}")
        check_positive_int("widen_factor", widen_factor)
        check_positive_int("num_classes", num_classes)
        check_fraction("dropout", dropout)
        self.num_classes = num_classes
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.normalize = make_normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        groups = []
        in_planes = widths[0]
        for g, stride in enumerate((1, 2, 2)):
            blocks = []
            for b in range(n):
                blocks.append(_WideBlock(in_planes, widths[g + 1], stride if b == 0 else 1, dropout))
                in_planes = widths[g + 1]
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.ModuleList(groups)
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        for g in self.groups:
            out = g(out)
        return self.fc(self.pool(self.relu(self.bn(out))))
