"""ReColorAdv, StAdv and Compose: maths against brute force, budgets, contract, strength on digits."""

import itertools

import pytest
import torch

from lightning_robust.attacks import PGD, Compose, ReColorAdv, StAdv
from lightning_robust.attacks.functional_base import apply_chain, neighbour_smoothness
from lightning_robust.attacks.recoloradv import apply_color_offsets, grid_node_positions
from lightning_robust.attacks.stadv import apply_flow

# Small grids and few steps keep the tests fast; the paper's settings are measured in benchmarks/.
FAST_RECOLOR = dict(resolution=(8, 8, 8))
FAST_STADV = dict(bound=0.1, steps=30, lr=0.005)


def _trilinear_reference(c: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-pixel trilinear interpolation written out with loops (colours clamped to the cube)."""
    B, _, H, W = c.shape
    res = offsets.shape[2:]
    out = torch.empty_like(c)
    for b, i, j in itertools.product(range(B), range(H), range(W)):
        col = c[b, :, i, j].clamp(0, 1)
        t = [float(col[k]) * (res[k] - 1) for k in range(3)]
        base = [min(int(t[k]), res[k] - 2) for k in range(3)]
        frac = [t[k] - base[k] for k in range(3)]
        acc = torch.zeros(3, dtype=c.dtype)
        for corner in itertools.product((0, 1), repeat=3):
            w = 1.0
            for k in range(3):
                w *= frac[k] if corner[k] else 1 - frac[k]
            acc += w * offsets[b, :, base[0] + corner[0], base[1] + corner[1], base[2] + corner[2]]
        out[b, :, i, j] = c[b, :, i, j] + acc
    return out


def _smoothness_reference(params: torch.Tensor, axes) -> torch.Tensor:
    """Σ over nodes of Σ over in-grid axis neighbours of sqrt(||θ_g - θ_h||² + 1e-10), by rolling."""
    total = torch.zeros(params.shape[0], dtype=params.dtype)
    for axis in axes:
        n = params.shape[axis]
        for shift in (1, -1):
            d = params - params.roll(shift, dims=axis)
            valid = torch.ones(n, dtype=torch.bool)
            valid[0 if shift == 1 else n - 1] = False  # the wrapped-around neighbour does not exist
            shape = [1] * params.ndim
            shape[axis] = n
            term = (d.pow(2).sum(1, keepdim=True) + 1e-10).sqrt() * valid.view(shape)
            total += term.flatten(1).sum(1)
    return total


def test_colour_function_is_trilinear_interpolation(digits_rgb):
    g = torch.Generator().manual_seed(0)
    c = torch.rand(2, 3, 4, 5, generator=g, dtype=torch.float64) * 1.2 - 0.1  # some colours outside the cube
    offsets = torch.randn(2, 3, 4, 6, 5, generator=g, dtype=torch.float64) * 0.05
    assert torch.allclose(apply_color_offsets(c, offsets), _trilinear_reference(c, offsets), atol=1e-12)
    # At a control point the function moves the colour by exactly that point's offset.
    nodes = grid_node_positions((4, 6, 5), dtype=torch.float64)
    picked = nodes[:, 1:3, 2, 1:4].unsqueeze(0).repeat(2, 1, 1, 1)
    assert torch.allclose(apply_color_offsets(picked, offsets) - picked, offsets[:, :, 1:3, 2, 1:4], atol=1e-12)


@pytest.mark.parametrize("space", ["cieluv", "yuv", "rgb"])
def test_identity_grid_is_the_identity_map(space, digits_rgb):
    attack = ReColorAdv(color_space=space)
    x = torch.cat([digits_rgb[0][:8], torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))])
    zero = attack.init_params(x, random=False, generator=None)
    assert zero.shape == (16, 3, 16, 32, 32) and not zero.any()
    assert (attack.apply(x, zero) - x).abs().max() < 1e-5


@pytest.mark.parametrize("gamut", [True, False])
def test_projection_bounds_the_colour_function_everywhere(gamut):
    attack = ReColorAdv(eps=(0.02, 0.05, 0.08), resolution=(5, 6, 7), gamut_projection=gamut)
    g = torch.Generator().manual_seed(1)
    params = attack.project_params(torch.randn(3, 3, 5, 6, 7, generator=g) * 0.3, torch.zeros(3, 3, 2, 2))
    bound = torch.tensor([0.02, 0.05, 0.08]).view(1, 3, 1, 1, 1)
    nodes = grid_node_positions((5, 6, 7)).unsqueeze(0)
    assert (params.abs() <= bound + 1e-7).all()
    if not gamut:  # without the gamut step, moved control points are kept inside the cube instead
        assert ((nodes + params) >= -1e-7).all() and ((nodes + params) <= 1 + 1e-7).all()
    c = torch.rand(3, 3, 16, 16, generator=g)
    shift = (apply_color_offsets(c, params) - c).abs().amax((2, 3))  # [B, 3]
    assert (shift <= bound.view(1, 3) + 1e-6).all()
    # The random start is feasible too.
    start = attack.init_params(c, random=True, generator=g)
    assert (start.abs() <= bound + 1e-7).all() and start.abs().amax() > 0.5 * 0.08


def test_rgb_recoloradv_respects_its_budget_end_to_end(rgb_digits_cnn, digits_rgb):
    x, y = digits_rgb[0][-64:], digits_rgb[1][-64:]
    x_adv = ReColorAdv(eps=0.05, color_space="rgb", steps=20, lr=0.005, **FAST_RECOLOR)(rgb_digits_cnn, x, y)
    # In RGB the function moves each channel by at most eps; the clip to [0, 1] only moves towards x.
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def test_smoothness_penalties_match_brute_force_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    grid = torch.randn(2, 3, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    flow = torch.randn(2, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.allclose(neighbour_smoothness(grid, (2, 3, 4)), _smoothness_reference(grid, (2, 3, 4)))
    assert torch.allclose(neighbour_smoothness(flow, (2, 3)), _smoothness_reference(flow, (2, 3)))
    assert torch.autograd.gradcheck(lambda t: neighbour_smoothness(t, (2, 3, 4)), (grid,))
    assert torch.autograd.gradcheck(lambda t: neighbour_smoothness(t, (2, 3)), (flow,))


class _ReferenceSmoothnessReColorAdv(ReColorAdv):
    """ReColorAdv whose smoothness penalty is the brute-force expression, differentiated by autograd."""

    def regularizer(self, params: torch.Tensor) -> torch.Tensor:
        return _smoothness_reference(params, (2, 3, 4))


def test_fused_smoothness_gives_the_attack_of_the_autograd_reference(rgb_digits_cnn, digits_rgb):
    """At the paper's 16x32x32 grid in float32, the hand-written forward/backward of the penalty (issue 25:
    in-place unit differences, one scaling in the backward) leaves the attack's result within 1e-6 of the
    same attack with the penalty written as plain tensor maths and differentiated by autograd."""
    x, y = digits_rgb[0][-4:], digits_rgb[1][-4:]
    fused = ReColorAdv(steps=5, lr=0.01)(rgb_digits_cnn, x, y)
    reference = _ReferenceSmoothnessReColorAdv(steps=5, lr=0.01)(rgb_digits_cnn, x, y)
    assert (fused - reference).abs().max() <= 1e-6
    assert (fused - x).abs().max() > 1e-3  # the attack moved the colours: the comparison is not vacuous
    # The gradients themselves, on a random grid of the paper's size.
    g = torch.Generator().manual_seed(4)
    grid = (torch.rand(2, 3, 16, 32, 32, generator=g) * 0.12 - 0.06).requires_grad_(True)
    w = torch.rand(2, generator=g)
    (ours,) = torch.autograd.grad(neighbour_smoothness(grid, (2, 3, 4)), grid, w)
    (ref,) = torch.autograd.grad(_smoothness_reference(grid, (2, 3, 4)), grid, w)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_flow_field_warps_by_the_stated_amount():
    x = torch.linspace(0, 1, 9).view(1, 1, 1, 9).expand(2, 1, 5, 9).contiguous()  # horizontal ramp
    assert (apply_flow(x, torch.zeros(2, 2, 5, 9)) - x).abs().max() < 1e-6
    flow = torch.zeros(2, 2, 5, 9)
    flow[:, 0] = 0.25 * 2 / 8  # a quarter pixel to the right, in normalized units ((W - 1) / 2 px per unit)
    warped = apply_flow(x, flow)
    assert torch.allclose(warped[..., :-1], x[..., :-1] + 0.25 / 8, atol=1e-6)
    assert torch.allclose(warped[..., -1], x[..., -1])  # border pixels sample the border


def test_stadv_output_stays_in_each_pixels_neighbourhood(trained_digits_cnn, digits_tensors):
    x, y = digits_tensors[0][-64:], digits_tensors[1][-64:]
    attack = StAdv(**FAST_STADV)  # 0.1 normalized = 0.35 px on 8x8: samples from the 3x3 neighbourhood
    x_adv = attack(trained_digits_cnn, x, y)
    lo = -torch.nn.functional.max_pool2d(-x, 3, stride=1, padding=1)
    hi = torch.nn.functional.max_pool2d(x, 3, stride=1, padding=1)
    assert (x_adv >= lo - 1e-6).all() and (x_adv <= hi + 1e-6).all()
    assert not torch.equal(x_adv, x)


def test_compose_of_one_component_is_that_attack(rgb_digits_cnn, digits_rgb):
    x, y = digits_rgb[0][-32:], digits_rgb[1][-32:]
    alone = ReColorAdv(steps=10, lr=0.004, **FAST_RECOLOR)
    composed = Compose([ReColorAdv(**FAST_RECOLOR)], steps=10, lr=0.004)
    assert torch.allclose(alone(rgb_digits_cnn, x, y), composed(rgb_digits_cnn, x, y), atol=1e-6)


def test_compose_applies_components_in_order(digits_rgb):
    x = digits_rgb[0][:4]
    parts = [ReColorAdv(**FAST_RECOLOR), StAdv(), PGD(eps=0.03)]
    g = torch.Generator().manual_seed(3)
    params = [p.project_params(p.init_params(x, random=True, generator=g), x) for p in parts]
    manual = (apply_flow(parts[0].apply(x, params[0]), params[1]) + params[2]).clamp(0, 1)
    assert torch.allclose(apply_chain(parts, x, params), manual, atol=1e-6)


def test_every_functional_attack_costs_the_digits_cnn_accuracy(rgb_digits_cnn, digits_rgb):
    x, y = digits_rgb[0][-96:], digits_rgb[1][-96:]
    net = rgb_digits_cnn

    def acc(attack):
        x_adv = attack(net, x, y)
        return (net(x_adv).argmax(1) == y).float().mean().item()

    clean = (net(x).argmax(1) == y).float().mean().item()
    recolor = [acc(ReColorAdv(eps=e, steps=50, lr=e / 20, **FAST_RECOLOR)) for e in (0.02, 0.06, 0.15)]
    stadv = [acc(StAdv(bound=b, steps=20, lr=b / 10)) for b in (0.03, 0.1)]
    combo = acc(Compose([ReColorAdv(**FAST_RECOLOR), StAdv(bound=0.05), PGD(eps=4 / 255)], steps=30, lr=0.003))
    assert clean > recolor[0] >= recolor[1] >= recolor[2] and recolor[2] < clean - 0.2
    assert clean > stadv[0] >= stadv[1] and stadv[1] < clean - 0.5
    assert combo < clean - 0.5
    assert combo <= min(recolor[1], acc(PGD(eps=4 / 255, alpha=1 / 255, steps=20)))


@pytest.mark.parametrize(
    "attack",
    [ReColorAdv(steps=3, **FAST_RECOLOR), StAdv(steps=3),
     Compose([ReColorAdv(**FAST_RECOLOR), PGD(eps=0.03)], steps=3)],
    ids=["recoloradv", "stadv", "compose"],
)
def test_functional_contract(attack, tiny_images):
    from lightning_robust.nets import SmallCNN

    x = tiny_images[0].expand(-1, 3, -1, -1).contiguous()
    y = tiny_images[1]
    net = SmallCNN(in_channels=3, input_size=8).train()
    net.classifier[0].eval()
    net(x).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    with torch.inference_mode():
        x_adv = attack(net, x, y)
    assert net.training and not net.classifier[0].training
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert x_adv.shape == x.shape and not x_adv.requires_grad and x_adv.min() >= 0 and x_adv.max() <= 1
    # Clean mistakes stay mistakes: the identity is one of the iterates the attack keeps the best of.
    wrong = net.eval()(x).argmax(1) != y
    assert (net(x_adv).argmax(1)[wrong] != y[wrong]).all()


def test_zero_budget_returns_the_input(rgb_digits_cnn, digits_rgb):
    x, y = digits_rgb[0][:8], digits_rgb[1][:8]
    for attack in (ReColorAdv(eps=0.0), StAdv(bound=0.0), Compose([ReColorAdv(eps=0.0), PGD(eps=0.0)])):
        assert torch.equal(attack(rgb_digits_cnn, x, y), x)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: ReColorAdv(eps=-0.1), "eps must be a non-negative number"),
        (lambda: ReColorAdv(eps=(0.1, 0.1)), "eps must be one number or three"),
        (lambda: ReColorAdv(resolution=(16, 1, 32)), "resolution must be an integer >= 2"),
        (lambda: ReColorAdv(color_space="hsv"), "color_space must be one of"),
        (lambda: ReColorAdv(steps=0), "steps must be a positive integer"),
        (lambda: StAdv(bound=-1.0), "bound must be a non-negative number"),
        (lambda: StAdv(optimizer="sgd"), "optimizer must be one of"),
        (lambda: Compose([]), "attacks must hold at least one perturbation"),
        (lambda: Compose([torch.nn.Identity()]), "attacks must be perturbations"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_recoloradv_needs_rgb_images(trained_digits_cnn, digits_tensors):
    with pytest.raises(ValueError, match=r"x must be RGB images \[B, 3, H, W\]"):
        ReColorAdv()(trained_digits_cnn, digits_tensors[0][:2], digits_tensors[1][:2])
