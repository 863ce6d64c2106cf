"""The 28x28 GAN generator and critic trunk of the WGAN-GP MNIST code, as used by the entropic GAN paper.

Balaji et al. (arXiv 1810.04147) train their MNIST entropic GAN with Gulrajani et al.'s (arXiv 1704.00028)
MNIST networks: a generator ``Linear -> BN -> ReLU -> 3 transposed 5x5 convs (BN, ReLU) -> sigmoid`` and a
critic of three stride-2 5x5 convs with LeakyReLU(0.2). The critic trunk here stops at the flattened
features, so :class:`~lightning_robust.nets.DualCritic` can put the two potentials' heads on it.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_robust.utils.validation import check_positive_int

__all__ = ["MNISTCriticTrunk", "MNISTGenerator"]


def _up(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    # 'SAME' stride-2 transposed 5x5 convolution: H -> 2H.
    return nn.ConvTranspose2d(c_in, c_out, 5, stride=2, padding=2, output_padding=1)


class MNISTGenerator(nn.Module):
    """``z [B, latent_dim] -> images [B, channels, 28, 28]`` in [0, 1].

    Args:
        latent_dim: latent size (128 in the paper's code).
        width: base channel width ``d`` (64 in the paper's code; feature maps 4d, 2d, d).
        channels: output channels.
        batch_norm: BatchNorm after the hidden layers (the paper's code uses it).

    Example:
        >>> MNISTGenerator(latent_dim=128)(torch.randn(4, 128)).shape
        torch.Size([4, 1, 28, 28])
    """

    def __init__(self, latent_dim: int = 128, width: int = 64, channels: int = 1, batch_norm: bool = True) -> None:
        super().__init__()
        check_positive_int("latent_dim", latent_dim)
        check_positive_int("width", width)
        check_positive_int("channels", channels)
        self.latent_dim, self.width = latent_dim, width

        def norm(c: int, two_d: bool) -> nn.Module:
            if not batch_norm:
                return nn.Identity()
            return nn.BatchNorm2d(c) if two_d else nn.BatchNorm1d(c)

        self.fc = nn.Sequential(nn.Linear(latent_dim, 16 * 4 * width), norm(16 * 4 * width, False), nn.ReLU())
        self.up1 = nn.Sequential(_up(4 * width, 2 * width), norm(2 * width, True), nn.ReLU())   # 4 -> 8
        self.up2 = nn.Sequential(_up(2 * width, width), norm(width, True), nn.ReLU())           # 7 -> 14
        self.up3 = _up(width, channels)                                                        # 14 -> 28

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z.reshape(z.shape[0], -1)).reshape(z.shape[0], 4 * self.width, 4, 4)
        h = self.up1(h)[:, :, :7, :7]  # crop 8x8 to 7x7 so that two more doublings give 28
        return torch.sigmoid(self.up3(self.up2(h)))


class MNISTCriticTrunk(nn.Module):
    """``images [B, channels, 28, 28] -> features [B, 64 * width]``: three stride-2 5x5 convs, LeakyReLU(0.2).

    Args:
        width: base channel width ``d`` (64 in the paper's code; feature maps d, 2d, 4d).
        channels: input channels.

    Attributes:
        out_features: ``4 * 4 * 4 * width`` (4096 for the default), the size the heads take.
    """

    def __init__(self, width: int = 64, channels: int = 1) -> None:
        super().__init__()
        check_positive_int("width", width)
        check_positive_int("channels", channels)
        self.channels = channels
        self.out_features = 4 * 4 * 4 * width
        self.layers = nn.Sequential(
            nn.Conv2d(channels, width, 5, stride=2, padding=2), nn.LeakyReLU(0.2),          # 28 -> 14
            nn.Conv2d(width, 2 * width, 5, stride=2, padding=2), nn.LeakyReLU(0.2),     # 14 -> 7
            nn.Conv2d(2 * width, 4 * width, 5, stride=2, padding=2), nn.LeakyReLU(0.2),  # 7 -> 4
            nn.Flatten(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.reshape(x.shape[0], self.channels, 28, 28))
