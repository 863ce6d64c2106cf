"""Clean-label poisons: closed forms with linear feature maps, the simplex solver against scipy, contract."""

import numpy as np
import pytest
import torch
from torch import nn

from lightning_robust.attacks import (
    ConvexPolytope,
    FeatureCollision,
    LayerFeatures,
    convex_polytope_loss,
    nearest_to_target,
    project_simplex,
    simplex_least_squares,
    simplex_projected_gradient,
)


class Flat(nn.Module):
    """Identity feature map on flattened images (d_feat = d_in)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _images(n: int, seed: int = 0, size: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand(n, 1, size, size, generator=g, dtype=torch.float64)


def test_feature_collision_reaches_the_closed_form_with_identity_features():
    # f(x) = x: the fixed point of the paper's update minimises ||x - t||^2 + (beta/2)||x - b||^2,
    # i.e. x* = (2 t + beta b) / (2 + beta), a convex combination (inside [0, 1]).
    base, target = _images(3, 0), _images(1, 1)[0]
    for beta in (0.5, 2.0, 8.0):
        poisons = FeatureCollision(steps=300, lr=0.2, beta=beta)(Flat(), base, target)
        expected = (2 * target + beta * base) / (2 + beta)
        assert torch.allclose(poisons, expected, atol=1e-6)


def test_feature_collision_watermark_and_beta_scaling():
    base, target = _images(2, 2), _images(1, 3)[0]
    attack = FeatureCollision(steps=300, lr=0.2, beta=2.0, opacity=0.3)
    anchor = 0.7 * base + 0.3 * target
    assert torch.allclose(attack(Flat(), base, target), (2 * target + 2.0 * anchor) / 4.0, atol=1e-6)
    # The paper's default: beta0 (d_feat / d_in)^2 for pixels in [0, 255].
    assert FeatureCollision().effective_beta(2048, 299 * 299 * 3) == pytest.approx(
        0.25 * (2048 / 268203) ** 2 * 255**2)


def test_feature_collision_moves_features_toward_the_target_and_respects_eps():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    f = LayerFeatures(net, "4")
    base, target = _images(4, 4).float(), _images(1, 5)[0].float()
    poisons = FeatureCollision(steps=100, lr=0.5, beta=0.01, eps=0.2)(f, base, target)
    with torch.no_grad():
        before = (f(base) - f(target[None])).norm(dim=1)
        after = (f(poisons) - f(target[None])).norm(dim=1)
    assert (after < before).all()
    assert (poisons - base).abs().max() <= 0.2 + 1e-6 and poisons.min() >= 0 and poisons.max() <= 1


def test_project_simplex_matches_a_scipy_reference():
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    w = project_simplex(v)
    assert torch.allclose(w.sum(1), torch.ones(6, dtype=torch.float64)) and (w >= 0).all()
    for row, got in zip(v.numpy(), w.numpy()):
        res = minimize(lambda z, r=row: ((z - r) ** 2).sum(), np.full(5, 0.2), method="SLSQP",
                       bounds=[(0, None)] * 5, constraints={"type": "eq", "fun": lambda z: z.sum() - 1},
                       options={"ftol": 1e-14, "maxiter": 500})
        assert np.allclose(got, res.x, atol=1e-5)


def test_simplex_least_squares_matches_scipy():
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(1)
    for k, d in ((3, 10), (5, 40), (6, 4), (12, 30)):  # k <= 10: exact enumeration; 12: FISTA
        feats = torch.randn(k, d, generator=g, dtype=torch.float64)
        target = torch.randn(d, generator=g, dtype=torch.float64)
        c = simplex_least_squares(feats, target, steps=5000, tol=1e-12)
        f, t = feats.numpy(), target.numpy()
        res = minimize(lambda z, f=f, t=t: ((f.T @ z - t) ** 2).sum(), np.full(k, 1 / k), method="SLSQP",
                       bounds=[(0, None)] * k, constraints={"type": "eq", "fun": lambda z: z.sum() - 1},
                       options={"ftol": 1e-15, "maxiter": 1000})
        ours = float(((feats.T @ c - target) ** 2).sum())
        assert ours <= res.fun + 1e-7
        assert abs(float(c.sum()) - 1) < 1e-9 and (c >= 0).all()


@pytest.mark.parametrize("solver", ["projected_gradient", "exact"])
def test_convex_polytope_puts_the_target_inside_the_hull(solver):
    # Identity features, target = a convex combination of points near the bases: CP must (almost) reach a
    # zero loss within the eps-box, for every extractor of the ensemble.
    base = _images(4, 6)
    mix = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
    shift = 0.05 * (torch.rand(base.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64) - 0.5)
    target = (mix.view(-1, 1, 1, 1) * (base + shift)).sum(0)
    ensemble = [Flat(), nn.Sequential(nn.Flatten(), nn.Identity())]
    attack = ConvexPolytope(steps=150, lr=0.005, eps=0.05, coefficient_solver=solver, coeff_steps=200)
    poisons = attack(ensemble, base, target)
    assert (poisons - base).abs().max() <= 0.05 + 1e-9
    feats = [f(poisons) for f in ensemble]
    coeffs = [simplex_least_squares(fe, f(target[None])[0], tol=1e-12, steps=5000) for fe, f in zip(feats, ensemble)]
    start = convex_polytope_loss([f(base) for f in ensemble], [f(target[None]) for f in ensemble],
                                 [simplex_least_squares(f(base), f(target[None])[0]) for f in ensemble])
    end = convex_polytope_loss(feats, [f(target[None]) for f in ensemble], coeffs)
    assert float(end) < 1e-3 * float(start)


def test_project_simplex_matches_brute_force_over_supports():
    # Reference by enumeration: on a support S the projection is v_S - (sum(v_S) - 1) / |S| (zero elsewhere);
    # the projection is the feasible (non-negative) candidate closest to v.
    g = torch.Generator().manual_seed(3)
    v = torch.randn(20, 5, generator=g, dtype=torch.float64) * 1.5
    got = project_simplex(v)
    for row, w in zip(v, got):
        best, best_dist = None, float("inf")
        for mask in range(1, 2**5):
            s = torch.tensor([(mask >> j) & 1 for j in range(5)], dtype=torch.bool)
            cand = torch.zeros(5, dtype=torch.float64)
            cand[s] = row[s] - (row[s].sum() - 1) / int(s.sum())
            if (cand >= -1e-12).all() and float((cand - row).norm()) < best_dist:
                best, best_dist = cand, float((cand - row).norm())
        assert best is not None and torch.allclose(w, best, atol=1e-10)


def test_simplex_projected_gradient_reaches_the_exact_minimiser_for_a_batch():
    # The authors' coefficient update (projected gradient, warm start) converges to the minimiser that the
    # support enumeration finds exactly; batched over an "ensemble" of three problems.
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(3, 5, 12, generator=g, dtype=torch.float64)
    targets = torch.randn(3, 12, generator=g, dtype=torch.float64)
    c = simplex_projected_gradient(feats, targets, steps=20_000, tol=1e-12)
    assert c.shape == (3, 5) and torch.allclose(c.sum(1), torch.ones(3, dtype=torch.float64)) and (c >= 0).all()
    for fe, tg, ci in zip(feats, targets, c):
        exact = simplex_least_squares(fe, tg)
        obj = lambda w, fe=fe, tg=tg: float(((fe.T @ w - tg) ** 2).sum())  # noqa: E731
        assert obj(ci) <= obj(exact) + 1e-8
    # Unbatched call, warm-started at the answer: stays there.
    c0 = simplex_projected_gradient(feats[0], targets[0], init=c[0], steps=10, tol=1e-12)
    assert torch.allclose(c0, c[0], atol=1e-8)


def _dropout_ensemble() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 8),
                          nn.ReLU()).double() for _ in range(3)]


def _hull_loss(f: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    """CP loss of one extractor (eval mode) with exactly solved coefficients: how far t is from the hull."""
    with torch.no_grad():
        f.eval()
        ft, fe = f(target[None]), f(x)
        return float(convex_polytope_loss([fe], [ft], [simplex_least_squares(fe, ft[0])]))


@pytest.mark.slow
def test_convex_polytope_moves_every_poison_and_closes_the_hull_in_every_extractor():
    # The authors' algorithm (projected-gradient coefficients) on an ensemble: every poison moves (with the
    # exact, sparse coefficients one of these four bases stays untouched), and in every extractor's feature
    # space the target's distance to the poisons' hull falls well below its start, decreasing along the run.
    nets = _dropout_ensemble()
    base = _images(4, 11)
    target = (1 - _images(1, 12)[0]) ** 2
    start = [_hull_loss(f, base, target) for f in nets]
    runs = [ConvexPolytope(steps=steps, lr=0.01, eps=0.1, coeff_steps=50)(nets, base, target) for steps in (40, 80)]
    for x in runs:
        moved = (x - base).flatten(1).abs().amax(1)
        assert (moved > 0.01).all(), moved
        assert moved.max() <= 0.1 + 1e-9 and x.min() >= 0 and x.max() <= 1
    mid, end = ([_hull_loss(f, x, target) for f in nets] for x in runs)
    for s, m, e in zip(start, mid, end):
        assert e <= 1.05 * m and e <= 0.35 * s, (start, mid, end)
    # The mechanism the default avoids: exact (sparse) coefficients leave a base without gradient.
    exact = ConvexPolytope(steps=30, lr=0.01, eps=0.1, coefficient_solver="exact")(nets, base, target)
    assert float((exact - base).flatten(1).abs().amax(1).min()) == 0.0


def test_convex_polytope_dropout_flag_turns_on_dropout_only_and_restores_flags():
    seen: list[tuple[bool, bool]] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 6).double()
            self.bn = nn.BatchNorm1d(6).double()
            self.drop = nn.Dropout(0.3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((self.bn.training, self.drop.training))
            return self.drop(torch.relu(self.bn(self.lin(x.flatten(1)))))

    probe = Probe().eval()
    base, target = _images(3, 13), _images(1, 14)[0]
    ConvexPolytope(steps=2, dropout=True, coeff_steps=5)(probe, base, target)
    assert seen and all(s == (False, True) for s in seen)  # BatchNorm in eval, dropout on
    assert not probe.training and not probe.drop.training and not probe.bn.training
    seen.clear()
    ConvexPolytope(steps=2, coeff_steps=5)(probe, base, target)
    assert seen and all(s == (False, False) for s in seen)


def test_contract_grads_modes_inference_mode():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).train()
    f = LayerFeatures(net, "3")
    base, target = _images(3, 8).float(), _images(1, 9)[0].float()
    for attack in (FeatureCollision(steps=3, beta=1.0), ConvexPolytope(steps=3)):
        with torch.inference_mode():
            poisons = attack(f, base, target)
        assert poisons.shape == base.shape and not poisons.requires_grad
        assert all(p.grad is None for p in net.parameters())
        assert net.training and net[2].training  # flags restored after crafting in eval mode
    with pytest.raises(ValueError, match="FeatureCollision takes one feature extractor"):
        FeatureCollision(steps=1)([f, f], base, target)


def test_nearest_to_target_orders_by_feature_distance():
    cands = _images(10, 10).float()
    target = cands[6] * 0.99
    idx = nearest_to_target(Flat(), cands, target, 3)
    d = (cands.flatten(1) - target.flatten()).norm(dim=1)
    assert idx.tolist() == torch.argsort(d)[:3].tolist() and idx[0] == 6


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: FeatureCollision(steps=0), "steps must be a positive integer"),
        (lambda: FeatureCollision(opacity=1.0), r"opacity must lie in \[0, 1\)"),
        (lambda: FeatureCollision(lr=-1.0), "lr must be a positive number"),
        (lambda: ConvexPolytope(eps=0), "eps must be a positive number"),
        (lambda: ConvexPolytope(momentum=1.0), r"momentum must lie in \[0, 1\)"),
        (lambda: ConvexPolytope(coefficient_solver="lstsq"), "coefficient_solver must be one of"),
        (lambda: ConvexPolytope(dropout=1), "dropout must be a bool"),
        (lambda: LayerFeatures(nn.Linear(2, 2), "fc9"), "layer 'fc9' does not exist"),
    ],
)
def test_bad_hyper_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_images():
    base = _images(2, 0).float()
    with pytest.raises(ValueError, match=r"target must have shape \(1, 4, 4\)"):
        FeatureCollision(steps=1)(Flat(), base, torch.rand(1, 5, 5))
    with pytest.raises(ValueError, match=r"base must lie in \[0.0, 1.0\]"):
        FeatureCollision(steps=1)(Flat(), base + 2, base[0])
