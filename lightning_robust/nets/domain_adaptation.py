"""Feature extractors for domain adaptation: the digits CNN of the NW paper and an ImageNet backbone wrapper."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.nets.normalize import Normalize
from lightning_robust.utils.validation import check_choice, check_fraction, check_positive_int

__all__ = ["DigitFeatureExtractor", "TorchvisionBackbone"]


class DigitFeatureExtractor(nn.Module):
    """``conv5x5(32) - maxpool - ReLU - conv5x5(48) - dropout2d - maxpool - ReLU - flatten``.

    The feature network of the NW domain-adaptation experiments on MNIST -> MNIST-M (Balaji et al.,
    arXiv 1902.00415; the authors' ``_netF``, itself the DANN digits architecture of Ganin et al.). For
    28x28 inputs it gives ``48 * 4 * 4 = 768`` features; other sizes are supported (``out_features``).
    Grey inputs are repeated to three channels when ``in_channels=3``, so MNIST and MNIST-M share one net.

    Args:
        in_channels: channels the convolutions expect (3 in the paper).
        image_size: side of the square input (>= 12).
        dropout: probability of the 2-D dropout after the second convolution.
        mean, std: per-channel input normalisation ``(x - mean) / std`` as the first layer (the authors:
            0.5 and 0.5 for every channel); none by default.

    Raises:
        ValueError: on non-positive sizes, a dropout outside [0, 1), or only one of ``mean``/``std``.

    Example:
        >>> f = DigitFeatureExtractor(image_size=28)
        >>> f(torch.rand(4, 1, 28, 28)).shape, f.out_features
        (torch.Size([4, 768]), 768)
    """

    def __init__(self, in_channels: int = 3, image_size: int = 28, dropout: float = 0.5,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
        super().__init__()
        check_positive_int("in_channels", in_channels)
        check_positive_int("image_size", image_size, minimum=12)
        check_fraction("dropout", dropout)
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together (per-channel input normalisation), got "
                             f"mean={mean!r}, std={std!r}")
        self.in_channels, self.image_size = in_channels, image_size
        # The authors normalise inputs with mean = std = 0.5 per channel, i.e. to [-1, 1]; as a first layer, so
        # that callers keep passing [0, 1] pixels.
        self.normalize = Normalize(mean, std) if mean is not None and std is not None else None
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(32, 48, kernel_size=5), nn.Dropout2d(dropout), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        self.out_features = 48 * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"DigitFeatureExtractor expects [B, C, {self.image_size}, {self.image_size}] images, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[1] == 1 and self.in_channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if self.normalize is not None:
            x = self.normalize(x)
        return self.features(x)


class TorchvisionBackbone(nn.Module):
    """An ImageNet torchvision classifier without its last layer: images in [0, 1] -> pooled features.

    The usual feature network of VisDA-2017 adaptation (ResNet-50 in the VisDA papers; ResNet-18 here by
    default for speed). ImageNet normalisation is the first layer, so inputs stay in pixel space like
    every net of this package. ``weights="DEFAULT"`` loads torchvision's pretrained weights (downloaded
    on first use into torchvision's cache); ``None`` starts from random weights (tests, offline).

    Args:
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        weights: a torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...) or ``None``.

    Raises:
        ValueError: on an unknown architecture.

    Example:
        >>> net = TorchvisionBackbone("resnet18", weights=None)
        >>> net(torch.rand(2, 3, 224, 224)).shape, net.out_features
        (torch.Size([2, 512]), 512)
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, arch: str = "resnet18", weights: str | None = None) -> None:
        super().__init__()
        import torchvision

        check_choice("arch", arch, ("resnet18", "resnet34", "resnet50"))
        net = getattr(torchvision.models, arch)(weights=weights)
        self.out_features = int(net.fc.in_features)
        net.fc = nn.Identity()
        self.net = net
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net((x - self.mean) / self.std)
