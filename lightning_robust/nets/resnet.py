"""CIFAR ResNets: ResNet-18 (He et al. 2016, CIFAR variant as in Madry et al.) and ResNet-32 (He et al. §4.2).

ResNet-18 is the standard architecture for adversarial training on CIFAR-10; ResNet-32 is the classifier
attacked in the ReColorAdv paper (arXiv 1906.00001). Both use ``nn.ReLU`` modules, batch norm and
identity/projection shortcuts only, so they are piecewise linear in eval mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.nets.normalize import make_normalize
from lightning_robust.utils.validation import check_positive_int

__all__ = ["BasicBlock", "ResNet18", "ResNet32"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a shortcut: ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))``.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first convolution (2 halves the resolution).
        option: ``"B"`` projection shortcut (1x1 conv + BN, ResNet-18) or ``"A"`` parameter-free shortcut
            (subsample and zero-pad channels, the original CIFAR ResNet-20/32/44).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if option == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            else:
                self.shortcut = _PadShortcut(planes - in_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class _PadShortcut(nn.Module):
    """Option-A shortcut: spatial subsampling and zero channel padding (linear, parameter-free)."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = extra_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        return nn.functional.pad(x, (0, 0, 0, 0, half, self.extra - half))


class _CifarResNet(nn.Module):
    feature_layer = "pool"

    def __init__(
        self,
        stages: Sequence[tuple[int, int, int]],
        stem_channels: int,
        option: str,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        self.num_classes = num_classes
        self.normalize = make_normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, stem_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_channels)
        self.relu = nn.ReLU()
        planes_in = stem_channels
        layers = []
        for planes, blocks, stride in stages:
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(planes_in, planes, stride if b == 0 else 1, option))
                planes_in = planes
            layers.append(nn.Sequential(*stage))
        self.layers = nn.ModuleList(layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(planes_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(self.normalize(x))))
        for stage in self.layers:
            out = stage(out)
        return self.linear(self.pool(out))


class ResNet18(_CifarResNet):
    """ResNet-18 for 32x32 input: 3x3 stem, four stages of two BasicBlocks (64, 128, 256, 512 channels).

    Args:
        num_classes: outputs (10 for CIFAR-10).
        in_channels: input channels.
        width: base width (64 in the standard model).
        mean, std: optional input normalization (CIFAR-10 statistics for the paper-scale configs).

    Example:
        >>> ResNet18()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        check_positive_int("width", width)
        stages = [(width, 2, 1), (2 * width, 2, 2), (4 * width, 2, 2), (8 * width, 2, 2)]
        super().__init__(stages, width, "B", num_classes, in_channels, mean, std)


class ResNet32(_CifarResNet):
    """ResNet-32 of He et al. (2016) for CIFAR: three stages of 5 BasicBlocks (16, 32, 64 channels).

    Uses the paper's option-A (parameter-free) shortcuts; 0.46M parameters.

    Example:
        >>> ResNet32()(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        blocks_per_stage: int = 5,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        check_positive_int("blocks_per_stage", blocks_per_stage)
        n = blocks_per_stage
        super().__init__([(16, n, 1), (32, n, 2), (64, n, 2)], 16, "A", num_classes, in_channels, mean, std)
