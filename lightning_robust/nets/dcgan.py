"""DCGAN generator and discriminator whose widths scale with one capacity factor ``d``.

Radford et al. 2016 (arXiv 1511.06434) architecture, as used with the WGAN-GP loss ("W-DCGAN") by
Aguinaldo et al., "Compressing GANs using Knowledge Distillation" (arXiv 1902.00159): every hidden layer
of both nets has ``d`` times a fixed multiple of channels (``8d, 4d, 2d, d`` at 64 px), so the teacher and
its compressed students differ only in ``d`` and a compression ratio is a choice of two ``d`` values.

Spatial plans (side after each layer; the generator reads them left to right, the discriminator right to
left)::

    8 px:  4 -> 8                  (widths d)
    16 px: 4 -> 8 -> 16            (widths 2d, d)
    28 px: 4 -> 7 -> 14 -> 28      (widths 4d, 2d, d)
    32 px: 4 -> 8 -> 16 -> 32      (widths 4d, 2d, d)
    64 px: 4 -> 8 -> 16 -> 32 -> 64 (widths 8d, 4d, 2d, d)

Generator: ``z -> ConvT(nz, w0, 4) -> BN -> ReLU -> [ConvT(stride 2) -> BN -> ReLU]* -> ConvT(d, C) -> sigmoid``
(sigmoid, not tanh, because images in this library live in [0, 1]; ``sigmoid(2a) = (tanh(a) + 1) / 2``).
Discriminator: ``x -> Conv(C, d, stride 2) -> LeakyReLU(0.2) -> [Conv(stride 2) -> norm -> LeakyReLU]* ->
Conv(w, 1, 4)``, one unbounded score per image. WGAN-GP penalises per-sample input gradients, which batch
normalization would couple across the batch, so the discriminator's default ``norm`` is ``"none"``.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_robust.utils.validation import check_choice, check_non_negative, check_positive_int

__all__ = ["DCGANDiscriminator", "DCGANGenerator", "dcgan_plan"]

# image side -> spatial sides from the 4x4 seed up to the image
_PLANS: dict[int, tuple[int, ...]] = {
    8: (4, 8),
    16: (4, 8, 16),
    28: (4, 7, 14, 28),
    32: (4, 8, 16, 32),
    64: (4, 8, 16, 32, 64),
}


def dcgan_plan(image_size: int, d: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return ``(sides, widths)``: the spatial sides and hidden channel widths of a DCGAN for ``image_size``.

    ``widths[i]`` is the channel count at ``sides[i]`` (the last side is the image itself, so there is one
    width fewer than sides); the widths halve from ``d * 2**(k-1)`` down to ``d``.

    Raises:
        ValueError: if ``image_size`` is not one of 8, 16, 28, 32, 64, or ``d`` is not a positive integer.
    """
    if image_size not in _PLANS:
        raise ValueError(f"image_size must be one of {sorted(_PLANS)}, got {image_size!r}")
    check_positive_int("d", d)
    sides = _PLANS[image_size]
    k = len(sides) - 1
    return sides, tuple(d * 2 ** (k - 1 - i) for i in range(k))


def _up(c_in: int, c_out: int, side_in: int, side_out: int, bias: bool) -> nn.ConvTranspose2d:
    # 4 -> 7 needs kernel 3 (out = 2*(4-1) - 2 + 3 = 7); doubling uses the classic kernel 4, stride 2, pad 1.
    kernel = 3 if side_out == 2 * side_in - 1 else 4
    return nn.ConvTranspose2d(c_in, c_out, kernel, stride=2, padding=1, bias=bias)


def _down(c_in: int, c_out: int, side_in: int, bias: bool) -> nn.Conv2d:
    # 7 -> 4 needs kernel 3 (floor((7 + 2 - 3) / 2) + 1 = 4); halving uses kernel 4, stride 2, pad 1.
    kernel = 3 if side_in % 2 else 4
    return nn.Conv2d(c_in, c_out, kernel, stride=2, padding=1, bias=bias)


def _dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: conv weights ~ N(0, 0.02), norm scales ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    """DCGAN generator: latent ``[B, latent_dim]`` (or ``[B, latent_dim, 1, 1]``) to images in [0, 1].

    Args:
        image_size: output side: 8, 16, 28, 32 or 64.
        channels: output channels (1 grey, 3 colour).
        latent_dim: size of the latent vector ``z`` (the GAN base reads it from ``generator.latent_dim``).
        d: capacity factor; hidden widths are ``d`` times 8, 4, 2, 1 (64 px) and so on (see
            :func:`dcgan_plan`). The parameter count grows like ``d**2``, so teacher and student ``d``
            set the compression ratio.
        batch_norm: batch normalization after every hidden transposed convolution (DCGAN's default).
        dcgan_init: DCGAN's N(0, 0.02) weight initialisation (else PyTorch's default).

    Raises:
        ValueError: on an unsupported size or a non-positive ``channels``, ``latent_dim`` or ``d``.

    Example:
        >>> g = DCGANGenerator(image_size=28, channels=1, latent_dim=100, d=64)
        >>> g(torch.randn(2, 100)).shape
        torch.Size([2, 1, 28, 28])
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        latent_dim: int = 100,
        d: int = 64,
        batch_norm: bool = True,
        dcgan_init: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_positive_int("latent_dim", latent_dim)
        sides, widths = dcgan_plan(image_size, d)
        self.image_size, self.channels, self.latent_dim, self.d = image_size, channels, latent_dim, d
        layers: list[nn.Module] = [nn.ConvTranspose2d(latent_dim, widths[0], 4, stride=1, padding=0,
                                                      bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(widths[0]))
        layers.append(nn.ReLU())
        for i in range(1, len(widths)):
            layers.append(_up(widths[i - 1], widths[i], sides[i - 1], sides[i], bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(widths[i]))
            layers.append(nn.ReLU())
        layers.append(_up(widths[-1], channels, sides[-2], sides[-1], bias=True))
        layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)
        if dcgan_init:
            _dcgan_init(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim == 2:
            z = z[:, :, None, None]
        if z.ndim != 4 or z.shape[1] != self.latent_dim or z.shape[2:] != (1, 1):
            raise ValueError(f"z must have shape [B, {self.latent_dim}] or [B, {self.latent_dim}, 1, 1], "
                             f"got {tuple(z.shape)}")
        return self.net(z)


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator / WGAN critic: images ``[B, C, S, S]`` to one unbounded score per image ``[B]``.

    Args:
        image_size: input side: 8, 16, 28, 32 or 64.
        channels: input channels.
        d: capacity factor (first layer ``d`` channels, doubling at every halving of the side).
        norm: normalization after every strided convolution but the first: ``"none"`` (default; right
            for WGAN-GP, whose penalty is per sample), ``"batch"`` (original DCGAN), ``"layer"``
            (``GroupNorm(1, C)``, the WGAN-GP paper's suggestion) or ``"instance"``.
        negative_slope: LeakyReLU slope.
        dcgan_init: DCGAN's N(0, 0.02) weight initialisation.

    Raises:
        ValueError: on an unsupported size, norm, or non-positive ``channels`` / ``d``.

    Example:
        >>> D = DCGANDiscriminator(image_size=28, channels=1, d=64)
        >>> D(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2])
    """

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        d: int = 64,
        norm: str = "none",
        negative_slope: float = 0.2,
        dcgan_init: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("channels", channels)
        check_choice("norm", norm, ("none", "batch", "layer", "instance"))
        check_non_negative("negative_slope", negative_slope)
        sides, widths = dcgan_plan(image_size, d)
        self.image_size, self.channels, self.d = image_size, channels, d
        sides, widths = sides[::-1], widths[::-1]  # image side first; widths d, 2d, 4d, ...
        layers: list[nn.Module] = [_down(channels, widths[0], sides[0], bias=True),
                                   nn.LeakyReLU(negative_slope)]
        for i in range(1, len(widths)):
            layers.append(_down(widths[i - 1], widths[i], sides[i], bias=norm == "none"))
            if norm == "batch":
                layers.append(nn.BatchNorm2d(widths[i]))
            elif norm == "layer":
                layers.append(nn.GroupNorm(1, widths[i]))
            elif norm == "instance":
                layers.append(nn.InstanceNorm2d(widths[i], affine=True))
            layers.append(nn.LeakyReLU(negative_slope))
        layers.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=0, bias=True))
        self.net = nn.Sequential(*layers)
        if dcgan_init:
            _dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1:] != (self.channels, self.image_size, self.image_size):
            raise ValueError(f"x must have shape [B, {self.channels}, {self.image_size}, {self.image_size}], "
                             f"got {tuple(x.shape)}")
        return self.net(x).flatten()
