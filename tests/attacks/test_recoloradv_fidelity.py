"""ReColorAdv against the authors' code (cassidylaidlaw/ReColorAdv): gamut projection, XYZ clamp, keep-best
rule, StAdv grid clipping. The references below are written from the formulas of the authors' code (their
rounded matrices and white point), independently of our colour-space module."""

import pytest
import torch

from lightning_robust.attacks import ReColorAdv, StAdv
from lightning_robust.attacks.color_spaces import cieluv_to_rgb, rgb_to_cieluv
from lightning_robust.attacks.functional_base import Perturbation, optimize_perturbations
from lightning_robust.attacks.recoloradv import grid_node_positions
from lightning_robust.attacks.stadv import apply_flow


def authors_from_rgb(x: torch.Tensor) -> torch.Tensor:
    """recoloradv/color_spaces.py, CIELUVColorSpace.from_rgb (sRGB -> scaled L*u*v*)."""
    x = x.double()
    lin = torch.where(x < 0.04045, x / 12.92, ((x.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)
    r, g, b = lin.unbind(1)
    X = 0.4124 * r + 0.3576 * g + 0.1805 * b
    Y = 0.2126 * r + 0.7152 * g + 0.0722 * b
    Z = 0.0193 * r + 0.1192 * g + 0.9504 * b
    d = X + 15 * Y + 3 * Z + 1e-10
    L = torch.where(Y < (6 / 29) ** 3, (29 / 3) ** 3 * Y, 116 * Y.clamp_min(1e-10) ** (1 / 3) - 16)
    u = 13 * L * (4 * X / d - 0.1978)
    v = 13 * L * (9 * Y / d - 0.4683)
    return torch.stack([L / 100, (u + 100) / 200, (v + 100) / 200], 1)


def authors_to_rgb(luv: torch.Tensor, xyz_max: float = 1.1) -> torch.Tensor:
    """CIELUVColorSpace.to_rgb, with its XYZ clamp to [0, 1.1] and final clamp to [0, 1]."""
    luv = luv.double()
    L, u, v = luv[:, 0] * 100, luv[:, 1] * 200 - 100, luv[:, 2] * 200 - 100
    up = u / (13 * L + 1e-10) + 0.1978
    vp = v / (13 * L + 1e-10) + 0.4683
    Y = torch.where(L <= 8, L * (3 / 29) ** 3, ((L + 16) / 116) ** 3)
    d = 4 * vp + 1e-10
    X, Y, Z = torch.stack([Y * 9 * up / d, Y, Y * (12 - 3 * up - 20 * vp) / d], 1).clamp(0, xyz_max).unbind(1)
    lin = torch.stack([3.2406 * X - 1.5372 * Y - 0.4986 * Z,
                       -0.9689 * X + 1.8758 * Y + 0.0415 * Z,
                       0.0557 * X - 0.2040 * Y + 1.0570 * Z], 1)
    out = torch.where(lin < 0.0031308, 12.92 * lin, 1.055 * lin.clamp_min(1e-10) ** (1 / 2.4) - 0.055)
    return out.clamp(0, 1)


def _well_conditioned(luv: torch.Tensor) -> torch.Tensor:
    """Points away from v' = 0, where the two codes' different epsilons decide the colour."""
    L = luv[:, 0] * 100
    vp = (luv[:, 2] * 200 - 100) / (13 * L).clamp_min(1e-6) + 0.4683
    return vp.abs() > 0.05


def test_cieluv_to_rgb_clamps_xyz_like_the_authors():
    g = torch.Generator().manual_seed(0)
    luv = torch.rand(4000, 3, 1, 1, dtype=torch.float64, generator=g)  # most of the cube is out of gamut
    ok = _well_conditioned(luv).flatten()
    ours, theirs = cieluv_to_rgb(luv).flatten(1)[ok], authors_to_rgb(luv).flatten(1)[ok]
    # Their matrices are rounded to 4 decimals (the sRGB gamma's steep start turns that into up to ~1e-2
    # near black); the clamps (XYZ to [0, 1.1], RGB to [0, 1]) must agree.
    assert (ours - theirs).abs().max() < 1e-2
    # A dark colour with a large chroma (L* = 2, v* = -12.1: v' is tiny) has Z = 2.2, beyond the clamp: the
    # clamp decides its green channel.
    dark_blue = torch.tensor([0.02, 0.5, 0.4395], dtype=torch.float64).view(1, 3, 1, 1)
    assert torch.allclose(cieluv_to_rgb(dark_blue), authors_to_rgb(dark_blue), atol=1e-2)
    assert (authors_to_rgb(dark_blue, xyz_max=float("inf")) - authors_to_rgb(dark_blue)).abs().max() > 0.05


def test_every_recoloured_pixel_is_the_image_of_an_in_gamut_control_point_within_the_bound():
    """Pixels that sit on grid nodes are moved by exactly one control point. After the authors' projection
    (cube clamp -> RGB -> clip -> back -> per-channel bound) each such control point is within the bound
    and is the nearest point of its bound's box to an in-gamut colour (the authors' recipe, computed here
    with their formulas); where that colour lies inside the box the control point is that colour, so the
    recoloured pixel's CIELUV colour is within the bound of the original."""
    res, eps = (6, 9, 9), 0.06
    nodes = grid_node_positions(res, dtype=torch.float64)  # [3, 6, 9, 9]
    node_rgb = cieluv_to_rgb(nodes.unsqueeze(0))
    in_gamut = (rgb_to_cieluv(node_rgb) - nodes.unsqueeze(0)).abs().amax(1)[0] < 1e-9  # [6, 9, 9]
    assert 20 < int(in_gamut.sum()) < in_gamut.numel()
    # Images whose pixels are the in-gamut nodes' colours, one node per pixel.
    pix = node_rgb[:, :, in_gamut]  # [1, 3, P]
    x = pix.unsqueeze(-1).float().repeat(2, 1, 1, 1)  # [2, 3, P, 1]
    attack = ReColorAdv(eps=eps, resolution=res)
    g = torch.Generator().manual_seed(0)
    # One grid moved far outside the bound, one a little beyond it (more in-gamut colours inside the box).
    raw = (torch.rand(2, 3, *res, generator=g) * 2 - 1) * torch.tensor([0.15, 0.07]).view(2, 1, 1, 1, 1)
    theta = attack.project_params(raw, x)
    x_adv = attack.apply(x, theta)

    points = nodes.unsqueeze(0).float() + theta  # the control points
    assert (theta.abs() <= eps + 1e-7).all()
    # The authors' recipe from the raw points: an in-gamut colour q, then its box-clamp.
    start = (nodes.unsqueeze(0) + raw.double()).clamp(0, 1)
    q = authors_from_rgb(authors_to_rgb(start))
    clamped = torch.minimum(torch.maximum(q, nodes - eps), nodes + eps)
    ok = _well_conditioned(start)
    assert ok[:, in_gamut].float().mean() > 0.9
    assert ((clamped - points.double()).abs().amax(1)[ok] < 2e-3).all()
    # Each pixel's new colour is the image of its own control point ...
    own = points[:, :, in_gamut].unsqueeze(-1)  # [2, 3, P, 1]
    assert torch.allclose(x_adv, cieluv_to_rgb(own), atol=1e-5)
    # ... and where the in-gamut colour needed no bound clamp, the pixel moved by at most eps in CIELUV.
    inside = ((q - nodes).abs() <= eps - 1e-3).all(1)[:, in_gamut] & ok[:, in_gamut]  # [2, P]
    assert int(inside.sum()) >= 20  # not vacuous
    shift = (rgb_to_cieluv(x_adv.double()) - rgb_to_cieluv(x.double())).abs().amax(1)[..., 0]  # [2, P]
    assert (shift[inside] <= eps + 1e-4).all()


def test_gamut_projection_keeps_a_black_pixel_dark():
    """The artefact of issue 23: offsets within 0.06 on the black corner of the grid (L* + 2, v* - 12)
    turn black bright blue when the control points are only kept in the cube; the gamut projection keeps
    the recoloured black pixel's lightness near the bound, for every offset of a lattice within it."""
    black = torch.zeros(1, 3, 1, 1)
    vals = torch.tensor([-0.06, 0.0, 0.06])
    worst = {True: 0.0, False: 0.0}
    for dl in (0.02, 0.06):
        for du in vals:
            for dv in vals:
                theta = torch.zeros(1, 3, 16, 32, 32)
                theta[:, 0, 0], theta[:, 1, 0], theta[:, 2, 0] = dl, du, dv  # the L* = 0 layer
                for gamut in (True, False):
                    attack = ReColorAdv(gamut_projection=gamut)
                    out = attack.apply(black, attack.project_params(theta, black))
                    lightness = 100 * float(rgb_to_cieluv(out.double())[0, 0, 0, 0])
                    worst[gamut] = max(worst[gamut], lightness)
    assert worst[False] > 3 * 6  # the artefact: far beyond the 6 units of L* the bound allows
    # Interpolated control points can still leave the gamut a little; clipping them adds some lightness.
    assert worst[True] <= 6 + 2


class _Shift(Perturbation):
    """x + θ with θ in [-1, 1] and R(θ) = Σ θ²: a toy component to watch which iterate is kept."""

    smoothness_weight = 1.0

    def init_params(self, x, random, generator):
        return torch.zeros_like(x)

    def apply(self, x, params):
        return x + params

    def project_params(self, params, x):
        return params.clamp(-1, 1)

    def regularizer(self, params):
        return params.pow(2).flatten(1).sum(1)


def test_keep_best_rules_return_the_stated_iterate():
    """Brute force: record every iterate's regularized objective and success, and check the returned one."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    comp = _Shift()

    def margin(logits, y):
        other = logits.clone()
        other[torch.arange(len(y)), y] = float("-inf")
        return other.amax(1) - logits.gather(1, y[:, None])[:, 0]

    seen = []

    def objective(logits, y):
        seen.append(logits.detach())
        return margin(logits, y)

    def success(logits, y):
        return logits.argmax(1) != y

    for rule in ("regularized", "success"):
        seen.clear()
        x_adv = optimize_perturbations(model, x, y, [comp], objective, success, steps=25, lr=0.05,
                                       keep_best=rule)
        logits = torch.stack(seen)  # [steps + 1, B, 3]
        # The iterates' parameters are not recorded; recompute each iterate's regularizer from a rerun.
        thetas = []
        params = torch.zeros_like(x, requires_grad=True)
        opt = torch.optim.Adam([params], lr=0.05, maximize=True)
        for _ in range(26):
            thetas.append(params.detach().clone())
            total = margin(model(x + params), y) - comp.regularizer(params)
            opt.zero_grad()
            total.sum().backward()
            opt.step()
            with torch.no_grad():
                params.clamp_(-1, 1)
        theta = torch.stack(thetas)  # [steps + 1, B, 4]
        totals = torch.stack([margin(lg, y) for lg in logits]) - theta.pow(2).sum(-1)
        ok = torch.stack([success(lg, y) for lg in logits])
        if rule == "regularized":
            pick = totals.argmax(0)
        else:
            best_success = torch.where(ok, totals, float("-inf")).argmax(0)
            best_failure = torch.stack([margin(lg, y) for lg in logits]).argmax(0)
            pick = torch.where(ok.any(0), best_success, best_failure)  # a success first where there is one
        expected = x + theta[pick, torch.arange(len(x))]
        assert torch.allclose(x_adv, expected, atol=1e-5), rule
    # The rules differ on this batch: some sample's smoothest success loses to a failure with a higher total.
    assert not bool((totals.argmax(0) == pick).all())


def test_keep_best_is_validated():
    with pytest.raises(ValueError, match="keep_best must be one of"):
        ReColorAdv(keep_best="last")


def test_stadv_keeps_the_sampling_grid_inside_the_image():
    x = torch.rand(2, 3, 5, 7)
    attack = StAdv(bound=0.5)
    flow = attack.project_params(torch.randn(2, 2, 5, 7) * 2, x)
    ys, xs = torch.linspace(-1, 1, 5), torch.linspace(-1, 1, 7)
    grid = torch.stack([xs.view(1, 7).expand(5, 7), ys.view(5, 1).expand(5, 7)])  # (x, y) channels
    assert (flow.abs() <= 0.5 + 1e-7).all()
    assert ((grid + flow) >= -1 - 1e-6).all() and ((grid + flow) <= 1 + 1e-6).all()
    # Zero padding never enters: pushing the border outwards samples the border pixel, not black.
    out = torch.zeros(2, 2, 5, 7)
    out[:, 0] = 0.3
    warped = apply_flow(x, out)
    assert torch.allclose(warped[..., -1], x[..., -1], atol=1e-6)
