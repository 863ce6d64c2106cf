"""Colour conversions: round trips, published CIELUV values of the sRGB primaries, gradients."""

import pytest
import torch

from lightning_robust.attacks.color_spaces import (
    cieluv_to_rgb,
    clip,
    color_space,
    rgb_to_cieluv,
    rgb_to_yuv,
    yuv_to_rgb,
)


@pytest.mark.parametrize("name", ["cieluv", "yuv", "rgb"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip(name, dtype):
    from_rgb, to_rgb = color_space(name)
    x = torch.rand(256, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)
    corners = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=dtype)] * 3).T.reshape(1, 3, 8, 1)
    for img in (x, corners):
        assert (to_rgb(from_rgb(img)) - img).abs().max() < 1e-5
        assert from_rgb(img).dtype == dtype


def test_cieluv_values_of_the_srgb_primaries():
    # L*, u*, v* of sRGB red, green, blue, white and mid grey under D65 (published reference values).
    rgb = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [0.5, 0.5, 0.5]], dtype=torch.float64)
    expected = torch.tensor([[53.24, 175.01, 37.76], [87.73, -83.08, 107.40], [32.30, -9.40, -130.35],
                             [100.0, 0.0, 0.0], [53.39, 0.0, 0.0]], dtype=torch.float64)
    luv = rgb_to_cieluv(rgb.T.reshape(1, 3, 5, 1)).reshape(3, 5).T
    ours = torch.stack([luv[:, 0] * 100, luv[:, 1] * 200 - 100, luv[:, 2] * 200 - 100], 1)
    assert torch.allclose(ours, expected, atol=0.02)


def test_yuv_is_bt601():
    yuv = rgb_to_yuv(torch.eye(3).reshape(3, 3, 1, 1))[:, :, 0, 0]
    assert torch.allclose(yuv[:, 0], torch.tensor([0.299, 0.587, 0.114]))
    # Pb and Pr span [-0.5, 0.5] (shifted to [0, 1]): blue has Pb = 0.5, red has Pr = 0.5.
    assert yuv[2, 1].item() == pytest.approx(1.0) and yuv[0, 2].item() == pytest.approx(1.0)
    assert torch.allclose(yuv_to_rgb(rgb_to_yuv(torch.ones(1, 3, 1, 1))), torch.ones(1, 3, 1, 1))


def test_gradients_are_finite_on_black_and_white_and_flow_through_the_clip():
    x = torch.tensor([0.0, 1.0, 0.5]).view(1, 1, 3, 1).expand(1, 3, 3, 1).contiguous().requires_grad_(True)
    out = cieluv_to_rgb(rgb_to_cieluv(x) + torch.tensor([0.03, -0.05, 0.05]).view(1, 3, 1, 1))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g).all()
    v = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    (gc,) = torch.autograd.grad(clip(v, 0.0, 1.0).sum(), v)
    assert torch.equal(clip(v, 0.0, 1.0), v.clamp(0, 1)) and gc.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_errors():
    with pytest.raises(ValueError, match="color_space must be one of"):
        color_space("hsv")
    with pytest.raises(ValueError, match=r"need \[B, 3, \.\.\.\] tensors"):
        rgb_to_cieluv(torch.rand(2, 1, 4, 4))


def _cube_points(dtype):
    """Every node of a 16x32x32 grid over the unit cube (black, out-of-gamut chroma, L* = 0 and 100
    included), each also moved by a random in-bound offset and clamped back to the cube."""
    from lightning_robust.attacks.recoloradv import grid_node_positions

    nodes = grid_node_positions((16, 32, 32), dtype=dtype).unsqueeze(0)
    g = torch.Generator().manual_seed(0)
    moved = (nodes + (torch.rand(2, *nodes.shape[1:], generator=g, dtype=dtype) * 2 - 1) * 0.06).clamp(0, 1)
    return torch.cat([nodes, moved])


def test_fused_gamut_round_trip_is_the_two_conversions():
    from lightning_robust.attacks.color_spaces import cieluv_gamut_round_trip

    # Same maths: in float64 the fused pass equals the two conversions up to float64 rounding.
    p64 = _cube_points(torch.float64)
    reference = rgb_to_cieluv(cieluv_to_rgb(p64))
    assert (cieluv_gamut_round_trip(p64) - reference).abs().max() < 1e-10
    # In float32 it is at least as close to that reference as the two float32 conversions it replaced
    # (ReColorAdv's projection used them), and agrees with them within float32 rounding.
    p32 = p64.float()
    fused = cieluv_gamut_round_trip(p32)
    old = rgb_to_cieluv(cieluv_to_rgb(p32, widen=False), widen=False)
    ref32 = rgb_to_cieluv(cieluv_to_rgb(p32.double()))
    assert fused.dtype == torch.float32
    assert (fused.double() - ref32).abs().max() <= (old.double() - ref32).abs().max() + 1e-6
    assert (fused - old).abs().max() < 5e-5
