"""DCGAN nets: shapes for every supported size, parameter counts in closed form, per-sample critic."""

import pytest
import torch

from lightning_robust.nets import DCGANDiscriminator, DCGANGenerator, build_net
from lightning_robust.nets.dcgan import dcgan_plan
from lightning_robust.utils import count_parameters


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (16, 1), (28, 1), (32, 3), (64, 3)])
def test_shapes_range_and_latent_forms(size, channels):
    g = DCGANGenerator(image_size=size, channels=channels, latent_dim=12, d=3).eval()
    z = torch.randn(4, 12)
    x = g(z)
    assert x.shape == (4, channels, size, size)
    assert x.min() >= 0 and x.max() <= 1  # images live in [0, 1]
    assert torch.equal(g(z[:, :, None, None]), x)  # [B, nz] and [B, nz, 1, 1] are the same latents
    for norm in ("none", "batch", "layer", "instance"):
        assert DCGANDiscriminator(image_size=size, channels=channels, d=3, norm=norm)(x).shape == (4,)


def _generator_count_64(d: int, nz: int, c: int) -> int:
    # ConvT(nz, 8d, 4) + BN, ConvT(8d, 4d) + BN, ConvT(4d, 2d) + BN, ConvT(2d, d) + BN, ConvT(d, c) + bias
    convs = 16 * (nz * 8 * d + 8 * d * 4 * d + 4 * d * 2 * d + 2 * d * d + d * c)
    return convs + 2 * (8 * d + 4 * d + 2 * d + d) + c


def _generator_count_28(d: int, nz: int, c: int) -> int:
    # ConvT(nz, 4d, 4) + BN, ConvT(4d, 2d, 3) + BN, ConvT(2d, d, 4) + BN, ConvT(d, c, 4) + bias
    return 16 * nz * 4 * d + 9 * 4 * d * 2 * d + 16 * 2 * d * d + 16 * d * c + 2 * (4 * d + 2 * d + d) + c


@pytest.mark.parametrize("d", [1, 2, 5, 64])
def test_parameter_counts_closed_form(d):
    assert count_parameters(DCGANGenerator(64, 3, 100, d)) == _generator_count_64(d, 100, 3)
    assert count_parameters(DCGANGenerator(28, 1, 100, d)) == _generator_count_28(d, 100, 1)


def test_matches_pytorch_dcgan_tutorial_size():
    # The PyTorch DCGAN tutorial's generator (nz=100, ngf=64, nc=3, no biases) has 3,576,704 parameters and
    # its discriminator (BatchNorm, no biases) 2,765,568; ours add a bias to the output layer(s) only.
    assert count_parameters(DCGANGenerator(64, 3, 100, 64)) == 3_576_704 + 3
    assert count_parameters(DCGANDiscriminator(64, 3, 64, norm="batch")) == 2_765_568 + 64 + 1


def test_width_plan_and_compression_scaling():
    assert dcgan_plan(64, 8) == ((4, 8, 16, 32, 64), (64, 32, 16, 8))
    assert dcgan_plan(28, 2) == ((4, 7, 14, 28), (8, 4, 2))
    # widths are linear in d, so the quadratic part of the count grows like d^2
    big, small = DCGANGenerator(32, 3, 100, 64), DCGANGenerator(32, 3, 100, 4)
    assert count_parameters(big) / count_parameters(small) > 30


def test_critic_without_norm_scores_each_sample_alone():
    # WGAN-GP penalises per-sample input gradients: the score of sample i must not depend on sample j.
    D = DCGANDiscriminator(image_size=16, channels=1, d=4, norm="none")
    x = torch.rand(3, 1, 16, 16)
    y = x.clone()
    y[1] = torch.rand(1, 16, 16)
    a, b = D(x), D(y)
    assert torch.allclose(a[[0, 2]], b[[0, 2]]) and not torch.allclose(a[1], b[1])


def test_registered_and_bad_arguments():
    assert isinstance(build_net("dcgan_generator", image_size=16, channels=1, d=2), DCGANGenerator)
    assert isinstance(build_net("dcgan_discriminator", image_size=16, channels=1, d=2), DCGANDiscriminator)
    with pytest.raises(ValueError, match=r"image_size must be one of \[8, 16, 28, 32, 64\], got 48"):
        DCGANGenerator(image_size=48)
    with pytest.raises(ValueError, match="d must be a positive integer, got 0"):
        DCGANDiscriminator(d=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        DCGANDiscriminator(norm="spectral")
    with pytest.raises(ValueError, match=r"z must have shape \[B, 100\]"):
        DCGANGenerator()(torch.randn(2, 7))
