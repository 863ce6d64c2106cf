"""Soundness, tightness and differentiability of the simplex and decision-boundary certificates."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_robust.certify import (
    CERTIFICATE_METHODS,
    NotPiecewiseLinearError,
    certify,
    decision_boundary_certificate,
    decision_boundary_radius,
    lipschitz_bound,
    local_affine_map,
    local_linear_radius,
    simplex_certificate,
)
from lightning_robust.nets import MLP


def pgd_l2(net: nn.Module, x: torch.Tensor, label: torch.Tensor, eps: torch.Tensor, steps: int = 100,
           restarts: int = 4, seed: int = 0) -> torch.Tensor:
    """Strong per-sample-radius L2 PGD on the margin loss, without a box constraint (the certificates
    hold on the whole input space). Returns, per sample, whether any iterate changed the prediction."""
    g = torch.Generator().manual_seed(seed)
    shape = (-1,) + (1,) * (x.ndim - 1)
    e = eps.view(shape)
    found = torch.zeros(len(x), dtype=torch.bool)
    for _ in range(restarts):
        d = torch.randn(x.shape, generator=g, dtype=x.dtype)
        d = d / d.flatten(1).norm(dim=1).view(shape) * e * torch.rand(len(x), generator=g, dtype=x.dtype).view(shape)
        for t in range(steps):
            d.requires_grad_(True)
            out = net(x + d)
            found |= (out.argmax(1) != label).detach()
            other = out.masked_fill(nn.functional.one_hot(label, out.shape[1]).bool(), -math.inf).amax(1)
            loss = (other - out.gather(1, label[:, None]).squeeze(1)).sum()
            (grad,) = torch.autograd.grad(loss, d)
            alpha = e * (0.2 * (1 - t / steps) + 0.02)
            with torch.no_grad():
                d = d + alpha * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-30).view(shape)
                d = d * (e / d.flatten(1).norm(dim=1).view(shape)).clamp(max=1.0)
        with torch.no_grad():
            found |= net(x + d).argmax(1) != label
    return found


def test_exhaustive_grid_on_a_2d_network(toy_2d):
    net, _, _ = toy_2d
    g = torch.Generator().manual_seed(1)
    x = torch.rand(80, 2, generator=g, dtype=torch.float64) * 2 - 1
    h = 4 / 800
    axis = torch.linspace(-2, 2, 801, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        grid_cls, x_cls = net(grid).argmax(1), net(x).argmax(1)
    dist = torch.cdist(x, grid)
    other = grid_cls[None, :] != x_cls[:, None]
    nearest_other = torch.where(other, dist, torch.full_like(dist, math.inf)).min(1).values
    radii = {m: certify(net, x, method=m) for m in ("simplex", "decision_boundary", "lipschitz")}
    for method, r in radii.items():
        # every grid input strictly inside the certified ball keeps the class of x
        assert not (other & (dist < r[:, None])).any(), method
        assert (r > 0).all() and (r <= nearest_other + 1e-12).all()
    rs, rd, rl = radii["simplex"], radii["decision_boundary"], radii["lipschitz"]
    assert (rd >= rs - 1e-12).all() and (rd >= rl - 1e-12).all()
    # Exact where the closest point of the linearized boundary lies in the activation region.
    amap = local_affine_map(net, x)
    lin = local_linear_radius(amap.logits, amap.weight, x_cls)
    exact = (lin <= amap.region_radius()) & (nearest_other < 1.5)
    assert exact.sum() >= 5
    assert torch.allclose(rd[exact], lin[exact]) and (nearest_other[exact] <= rd[exact] + 2 * h).all()
    assert float(rd.mean()) > 1.5 * float(rs.mean())  # leaving the region pays off on this net


@pytest.fixture(scope="module")
def digits_cases(trained_digits_mlp, trained_digits_cnn, digits_tensors):
    x, _ = digits_tensors
    # The CNN stays in float32 (as trained): the 0.1% slack below dwarfs float32 rounding.
    return {"mlp": (trained_digits_mlp, x[1400:1424].double()), "cnn": (trained_digits_cnn, x[1400:1416])}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_strong_attacks_find_nothing_inside_the_radius(digits_cases, name):
    import torchattacks

    net, x = digits_cases[name]
    with torch.no_grad():
        pred = net(x).argmax(1)
    rs = simplex_certificate(net, x)
    rd = decision_boundary_certificate(net, x)
    assert (rd >= rs - 1e-12).all() and (rd > 0).all()
    # PGD with the budget just inside each certified radius never changes the prediction ...
    assert not pgd_l2(net, x, pred, 0.999 * rd).any()
    # ... and a minimum-norm attack (FAB, torchattacks as the reference) only succeeds farther away.
    fab = torchattacks.FAB(copy.deepcopy(net).float(), norm="L2", eps=20.0, steps=30, n_restarts=2,
                           n_classes=10, seed=0)
    adv = fab(x.float(), pred).to(x.dtype)
    with torch.no_grad():
        hit = net(adv).argmax(1) != pred  # adversarial for the float64 network itself
    dist = (adv - x).flatten(1).norm(dim=1)
    assert hit.sum() >= len(x) // 2
    assert (dist[hit] >= rd[hit]).all()
    # The PGD above is strong: with a budget just beyond FAB's distance it succeeds almost always.
    assert pgd_l2(net, x[hit], pred[hit], 1.05 * dist[hit]).float().mean() >= 0.8


def test_simplex_certificate_is_differentiable():
    torch.manual_seed(0)
    net = MLP(4, 3, (6, 6)).double().eval()
    x = torch.rand(5, 4, dtype=torch.float64, requires_grad=True)
    y = net(x).argmax(1)
    assert torch.autograd.gradcheck(lambda z: simplex_certificate(net, z, y, signed=True), (x,))
    w0 = net.layers[1].weight.detach().clone().requires_grad_(True)

    def as_fn_of_weight(w: torch.Tensor) -> torch.Tensor:
        params = {**dict(net.named_parameters()), "layers.1.weight": w}
        return simplex_certificate(_Functional(net, params), x.detach(), y, signed=True)

    assert torch.autograd.gradcheck(as_fn_of_weight, (w0,))


class _Functional(nn.Module):
    """``net`` evaluated with substituted parameters (torch.func.functional_call) as a module."""

    def __init__(self, net: nn.Module, params: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.net, self.params = net, params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(self.net, self.params, (x,))


def test_decision_boundary_closed_form_matches_brute_force():
    """One facet, two classes, 3-D: psi = min over the facet plane of ||q|| + max(0, l(q)) / L by a grid."""
    g = torch.Generator().manual_seed(3)
    n_ok = 0
    for _ in range(12):
        gvec = torch.randn(3, generator=g, dtype=torch.float64)
        a = torch.randn(3, generator=g, dtype=torch.float64)
        m = float(torch.rand(1, generator=g)) * 2 + 0.1
        c = float(torch.rand(1, generator=g)) * 1.5 + 0.05
        lip = float(gvec.norm()) * (1 + 2 * float(torch.rand(1, generator=g)))
        weight = torch.stack([gvec, torch.zeros(3, dtype=torch.float64)])[None]
        r = decision_boundary_radius(torch.tensor([[m, 0.0]], dtype=torch.float64), weight,
                                     torch.tensor([[c]], dtype=torch.float64), a.norm().view(1, 1),
                                     torch.stack([torch.zeros(1, dtype=torch.float64), (gvec @ a).view(1)])[None],
                                     torch.tensor([0]), torch.tensor([[0.0, lip], [lip, 0.0]], dtype=torch.float64))
        # brute force over the plane a . q = -c (x = 0): q = d n + s u1 + t u2
        n = -a / a.norm()
        d = c / float(a.norm())
        u1 = torch.linalg.qr(torch.stack([n, torch.randn(3, generator=g, dtype=torch.float64),
                                          torch.randn(3, generator=g, dtype=torch.float64)], 1))[0][:, 1:]
        s = torch.linspace(-8, 8, 1601, dtype=torch.float64)
        ss, tt = torch.meshgrid(s, s, indexing="ij")
        q = d * n + ss[..., None] * u1[:, 0] + tt[..., None] * u1[:, 1]
        psi = q.norm(dim=-1) + (m + q @ gvec).clamp_min(0) / lip
        brute = min(m / float(gvec.norm()), float(psi.min()))
        assert float(r) <= brute + 1e-9
        assert float(r) == pytest.approx(brute, abs=0.02)
        n_ok += float(r) < m / float(gvec.norm()) - 1e-6  # the facet term mattered
    assert n_ok >= 3


def test_labels_signs_and_bounds(trained_digits_mlp, digits_tensors):
    net = trained_digits_mlp
    x, y = digits_tensors
    x, y = x[1400:1440].double(), y[1400:1440]
    with torch.no_grad():
        pred = net(x).argmax(1)
    lb = lipschitz_bound(net, (1, 8, 8))
    rs = simplex_certificate(net, x)
    rd = decision_boundary_certificate(net, x, lipschitz=lb)
    rl = certify(net, x, method="lipschitz", lipschitz=lb)
    assert (rd >= rs - 1e-12).all() and (rd >= rl - 1e-12).all() and (rs >= 0).all()
    assert torch.equal(simplex_certificate(net, x, pred), rs)
    wrong = (pred + 1) % 10
    assert (simplex_certificate(net, x, wrong) == 0).all()
    assert (simplex_certificate(net, x, wrong, signed=True) < 0).all()
    assert (decision_boundary_certificate(net, x, wrong, signed=True, lipschitz=lb) < 0).all()
    # certify(y=labels): zero exactly on the misclassified inputs
    r_true = certify(net, x, y, "decision_boundary", lipschitz=lb)
    assert torch.equal(r_true == 0, pred != y)


def test_bad_arguments(trained_digits_mlp):
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        certify(trained_digits_mlp, x, method="crown")
    with pytest.raises(ValueError, match="y must be"):
        simplex_certificate(trained_digits_mlp, x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="lipschitz"):
        decision_boundary_certificate(trained_digits_mlp, x, lipschitz=torch.ones(3, 3))
    with pytest.raises(TypeError, match="model"):
        simplex_certificate("net", x)  # type: ignore[arg-type]


def test_simplex_hinge_loss_vanishes_exactly_beyond_the_certificate(toy_2d):
    from lightning_robust.certify import simplex_hinge_loss

    net, x, _ = toy_2d
    x = x[:6]
    with torch.no_grad():
        y = net(x).argmax(1)
    _, cert = simplex_hinge_loss(net, x, y, 1.0, topk=1)
    assert torch.allclose(cert, simplex_certificate(net, x, y, signed=True))
    for i in range(len(x)):
        below, _ = simplex_hinge_loss(net, x[i:i + 1], y[i:i + 1], 0.99 * float(cert[i]), topk=1)
        above, _ = simplex_hinge_loss(net, x[i:i + 1], y[i:i + 1], 1.01 * float(cert[i]), topk=1)
        assert float(below) == 0.0 and float(above) > 0.0
    loss, _ = simplex_hinge_loss(net, x, (y + 1) % 3, 1.0)  # wrong labels: negative distances, big hinge
    assert float(loss) > 1.0


def test_empty_batch_gives_empty_radii():
    # Issue 18: an empty batch raised an IndexError from deep inside the tracer.
    net = MLP(4, 3, hidden=(5,))
    for method in CERTIFICATE_METHODS:
        r = certify(net, torch.zeros(0, 4), method=method)
        assert r.shape == (0,) and r.dtype == torch.float32
    assert simplex_certificate(net, torch.zeros(0, 4, dtype=torch.float64), signed=True).shape == (0,)


class _MaskNet(torch.nn.Module):
    """A ReLU written as a comparison mask: ``z * (z > 0)`` (or ``torch.where(z > 0, z, 0.1 z)``)."""

    def __init__(self, where: bool = False):
        super().__init__()
        self.where = where
        self.fc1, self.fc2 = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)

    def forward(self, x):
        z = self.fc1(x)
        return self.fc2(torch.where(z > 0, z, 0.1 * z) if self.where else z * (z > 0))


@pytest.mark.parametrize("where", [False, True])
def test_comparison_masks_get_a_clear_error(where):
    # Issue 18: `z > 0` on a traced activation raised "TypeError: '>' not supported between instances of
    # 'Traced' and 'int'"; it is now a NotPiecewiseLinearError that names the module and the comparison.
    net = _MaskNet(where)
    with pytest.raises(NotPiecewiseLinearError, match=r"top-level module \(_MaskNet\) compares an input-dependent "
                                                      r"tensor with `>`.*nn.ReLU"):
        simplex_certificate(net, torch.rand(2, 4))
    with pytest.raises(NotPiecewiseLinearError, match="compares"):
        decision_boundary_certificate(net, torch.rand(2, 4))
