"""Log-domain Sinkhorn against POT, brute-force references, finite differences and the envelope theorem."""

import warnings

import numpy as np
import ot
import pytest
import torch
from scipy.special import xlogy

from lightning_robust.ot import SinkhornConvergenceWarning, pairwise_cost, sinkhorn, sinkhorn_divergence

f64 = torch.float64


def _problem(n: int, m: int, seed: int = 0, d: int = 2):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g, dtype=f64), torch.randn(m, d, generator=g, dtype=f64) + 0.5
    a = torch.rand(n, generator=g, dtype=f64) + 0.1
    b = torch.rand(m, generator=g, dtype=f64) + 0.1
    return pairwise_cost(x, y), a / a.sum(), b / b.sum()


@pytest.mark.parametrize("method", ["absorb", "log"])
@pytest.mark.parametrize(("n", "m", "reg"), [(30, 20, 0.5), (15, 40, 0.1), (25, 25, 1.0), (20, 30, 0.03)])
def test_matches_pot_sinkhorn_log(n, m, reg, method):
    C, a, b = _problem(n, m)
    res = sinkhorn(C, a, b, reg=reg, tol=1e-12, max_iter=20000, method=method)
    P = ot.bregman.sinkhorn_log(a.numpy(), b.numpy(), C.numpy(), reg, numItermax=100000, stopThr=1e-14)
    assert res.converged
    np.testing.assert_allclose(res.plan.numpy(), P, atol=1e-6, rtol=0)
    assert abs(float(res.value) - float((P * C.numpy()).sum())) < 1e-6
    torch.testing.assert_close(res.plan.sum(1), a, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.plan.sum(0), b, atol=1e-6, rtol=0)
    # The objective is the entropic cost <P, C> + ε KL(P | a bᵀ), evaluated on POT's plan.
    kl = float((xlogy(P, P) - P * np.log(np.outer(a.numpy(), b.numpy()))).sum())
    assert abs(float(res.objective) - (float((P * C.numpy()).sum()) + reg * kl)) < 1e-6
    # The potentials are normalized: <a, f> = <b, g>.
    assert abs(float((a * res.f).sum() - (b * res.g).sum())) < 1e-10


def test_batched_equals_one_by_one_and_broadcasts_marginals():
    probs = [_problem(12, 9, seed=s) for s in range(3)]
    C = torch.stack([p[0] for p in probs])
    a = torch.stack([p[1] for p in probs])
    res = sinkhorn(C, a, probs[0][2], reg=0.3, tol=1e-12)  # b [m] broadcast over the batch
    assert res.plan.shape == (3, 12, 9) and res.value.shape == (3,) and res.f.shape == (3, 12)
    for i, (Ci, ai, _) in enumerate(probs):
        one = sinkhorn(Ci, ai, probs[0][2], reg=0.3, tol=1e-12)
        torch.testing.assert_close(res.plan[i], one.plan, atol=1e-10, rtol=0)
        torch.testing.assert_close(res.f[i], one.f, atol=1e-8, rtol=0)


@pytest.mark.parametrize("method", ["absorb", "log"])
def test_zero_weights_equal_the_reduced_problem(method):
    C, a, b = _problem(10, 8)
    a = a.clone()
    a[[2, 7]] = 0.0
    a = a / a.sum()
    keep = a > 0
    full = sinkhorn(C, a, b, reg=0.2, tol=1e-12, method=method)
    reduced = sinkhorn(C[keep], a[keep], b, reg=0.2, tol=1e-12, method=method)
    assert torch.isfinite(full.f).all() and torch.isfinite(full.g).all()
    assert torch.all(full.plan[~keep] == 0)
    torch.testing.assert_close(full.plan[keep], reduced.plan, atol=1e-10, rtol=0)
    Cg = C.clone().requires_grad_(True)
    sinkhorn(Cg, a, b, reg=0.2, tol=1e-12).value.backward()
    assert torch.isfinite(Cg.grad).all() and torch.all(Cg.grad[~keep] == 0)


@pytest.mark.parametrize("method", ["absorb", "log"])
def test_finite_and_near_exact_ot_at_tiny_reg(method):
    C, a, b = _problem(40, 30, seed=3)
    reg = 1e-3 * float(C.median())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SinkhornConvergenceWarning)
        cold = sinkhorn(C, a, b, reg=reg, max_iter=200, tol=1e-9, method=method)  # not converged, finite
        res32 = sinkhorn(C.float(), a.float(), b.float(), reg=reg, max_iter=200, tol=1e-5, method=method)
    for r in (cold, res32):
        assert torch.isfinite(r.plan).all() and torch.isfinite(r.f).all() and torch.isfinite(r.value)
    # ε-scaling with warm starts reaches the tiny-ε solution.
    f = None
    for r in np.geomspace(float(C.median()), reg, 8):
        res = sinkhorn(C, a, b, reg=float(r), max_iter=5000, tol=1e-9, f0=f, method=method)
        f = res.f
    assert res.converged and torch.isfinite(res.plan).all()
    exact = ot.emd2(a.numpy(), b.numpy(), C.numpy())
    # Entropic bias is O(ε log n) here: far below 0.1% of the cost.
    assert abs(float(res.value) - exact) < 1e-3 * exact


@pytest.mark.parametrize(("n", "m"), [(9, 6), (6, 9)])  # both Schur-complement branches of the backward
def test_gradient_matches_finite_differences(n, m):
    C, a, b = _problem(n, m, seed=1)
    w = torch.randn(n, dtype=f64)

    def loss(cost):
        r = sinkhorn(cost, a, b, reg=0.3, tol=1e-14, max_iter=20000)
        return r.value + (w * r.f).sum() + (r.g**2).sum() + (r.plan[0] ** 2).sum()

    Cg = C.clone().requires_grad_(True)
    loss(Cg).backward()
    h = 1e-6
    for s in range(3):
        E = torch.randn(C.shape, generator=torch.Generator().manual_seed(10 + s), dtype=f64)
        fd = (loss(C + h * E) - loss(C - h * E)) / (2 * h)
        assert abs(float(fd) - float((Cg.grad * E).sum())) < 1e-6 * max(1.0, abs(float(fd)))


def test_gradient_of_objective_is_the_plan_and_batched_backward():
    # Envelope theorem: d OT_ε / dC = P. Batched, so the backward's batched solve is exercised too.
    C = torch.stack([_problem(7, 11, seed=s)[0] for s in range(2)]).requires_grad_(True)
    res = sinkhorn(C, None, None, reg=0.5, tol=1e-13)
    res.objective.sum().backward()
    torch.testing.assert_close(C.grad, res.plan.detach(), atol=1e-9, rtol=0)


def test_gradient_through_torch_autograd_gradcheck():
    C, a, b = _problem(5, 4, seed=2)

    def fn(cost):
        r = sinkhorn(cost, a, b, reg=0.4, tol=1e-14, max_iter=20000)
        return r.f, r.g, r.value

    assert torch.autograd.gradcheck(fn, (C.clone().requires_grad_(True),), eps=1e-6, atol=1e-5)


def test_warm_start_converges_at_once_to_the_same_normalized_potentials():
    C, a, b = _problem(20, 15)
    cold = sinkhorn(C, a, b, reg=0.2, tol=1e-11)
    warm = sinkhorn(C, a, b, reg=0.2, tol=1e-11, f0=cold.f + 3.0)  # a gauge shift is the same solution
    assert warm.iterations <= 2 < cold.iterations
    torch.testing.assert_close(warm.f, cold.f, atol=1e-9, rtol=0)
    from_g = sinkhorn(C, a, b, reg=0.2, tol=1e-11, g0=cold.g)
    assert from_g.iterations <= 2
    torch.testing.assert_close(from_g.g, cold.g, atol=1e-9, rtol=0)


def test_iteration_cap_warns_and_reports():
    C, a, b = _problem(20, 15)
    with pytest.warns(SinkhornConvergenceWarning, match="did not converge in max_iter=3"):
        res = sinkhorn(C, a, b, reg=0.01, max_iter=3)
    assert res.iterations == 3 and not res.converged and float(res.error) > 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sinkhorn(C, a, b, reg=0.01, max_iter=3, warn=False)


def test_bad_inputs_give_clear_errors():
    C, a, b = _problem(5, 4)
    with pytest.raises(ValueError, match="reg must be a positive number, got 0"):
        sinkhorn(C, a, b, reg=0)
    with pytest.raises(ValueError, match=r"reg must be a positive number, got -0\.1"):
        sinkhorn(C, a, b, reg=-0.1)
    neg = a.clone()
    neg[0] = -0.1
    with pytest.raises(ValueError, match="a must be non-negative"):
        sinkhorn(C, neg, b)
    with pytest.raises(ValueError, match=r"b must sum to one .* got sums in \[2, 2\]"):
        sinkhorn(C, a, 2 * b)
    bad = C.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="cost contains NaN"):
        sinkhorn(bad, a, b)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="cost must be finite"):
        sinkhorn(bad, a, b)
    with pytest.raises(ValueError, match="a must have 5 entries"):
        sinkhorn(C, a[:3] / a[:3].sum(), b)
    with pytest.raises(ValueError, match="a requires grad"):
        sinkhorn(C, a.clone().requires_grad_(True), b)
    with pytest.raises(ValueError, match=r"cost must have shape \[..., n, m\]"):
        sinkhorn(C[0], a, b)
    with pytest.raises(ValueError, match="method must be one of"):
        sinkhorn(C, a, b, method="newton")


def test_sinkhorn_divergence_linear_matches_pot_and_entropic_properties():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 2, generator=g, dtype=f64)
    y = torch.randn(30, 2, generator=g, dtype=f64) * 0.7 + 1.0
    reg = 0.5
    ours = sinkhorn_divergence(x, y, reg=reg, objective="linear", tol=1e-12)
    ref = ot.bregman.empirical_sinkhorn_divergence(x.numpy(), y.numpy(), reg, metric="sqeuclidean",
                                                   numIterMax=100000, stopThr=1e-13)
    assert abs(float(ours) - float(ref)) < 1e-6
    # Debiased entropic divergence: zero on equal inputs, symmetric, positive otherwise.
    s_xy = sinkhorn_divergence(x, y, reg=reg, tol=1e-12)
    assert abs(float(sinkhorn_divergence(x, x, reg=reg, tol=1e-12))) < 1e-9
    assert abs(float(s_xy) - float(sinkhorn_divergence(y, x, reg=reg, tol=1e-12))) < 1e-8
    assert float(s_xy) > 0
    # Differentiable in the samples; the gradient matches finite differences.
    xg = x.clone().requires_grad_(True)
    sinkhorn_divergence(xg, y, reg=reg, tol=1e-13).backward()
    E = torch.randn(x.shape, generator=g, dtype=f64)
    h = 1e-6
    fd = (sinkhorn_divergence(x + h * E, y, reg=reg, tol=1e-13) - sinkhorn_divergence(x - h * E, y, reg=reg,
                                                                                        tol=1e-13)) / (2 * h)
    assert abs(float(fd) - float((xg.grad * E).sum())) < 1e-6
    with pytest.raises(ValueError, match="objective must be one of"):
        sinkhorn_divergence(x, y, objective="dual")
