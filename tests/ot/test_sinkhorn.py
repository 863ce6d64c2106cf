"""Log-domain Sinkhorn against POT, brute-force references, finite differences and the envelope theorem."""

import math
import warnings

import numpy as np
import ot
import pytest
import torch
from scipy.special import xlogy

from lightning_robust.ot import SinkhornConvergenceWarning, pairwise_cost, sinkhorn, sinkhorn_divergence

f64 = torch.float64
# Issue 26: every solve in this file must converge; the tests that probe the cap catch the warning themselves.
pytestmark = pytest.mark.filterwarnings("error::lightning_robust.ot.SinkhornConvergenceWarning")


def _problem(n: int, m: int, seed: int = 0, d: int = 2):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, d, generator=g, dtype=f64), torch.randn(m, d, generator=g, dtype=f64) + 0.5
    a = torch.rand(n, generator=g, dtype=f64) + 0.1
    b = torch.rand(m, generator=g, dtype=f64) + 0.1
    return pairwise_cost(x, y), a / a.sum(), b / b.sum()


_REGS = [1.0, 0.1, 0.01, pytest.param(0.001, marks=pytest.mark.slow)]  # x median cost; POT is slow at 1e-3


@pytest.mark.parametrize("rel_reg", _REGS)
@pytest.mark.parametrize(("n", "m", "seed"), [(16, 11, 0), (11, 16, 1)])
def test_defaults_converge_to_pot_sinkhorn_log(n, m, seed, rel_reg):
    # Issue 21: with default arguments, down to reg = 1e-3 x median cost, on non-square problems with
    # non-uniform weights, the plan, value and marginals match POT run to convergence.
    C, a, b = _problem(n, m, seed=seed)
    reg = rel_reg * float(C.median())
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkhornConvergenceWarning)
        res = sinkhorn(C, a, b, reg=reg)
    P = ot.bregman.sinkhorn_log(a.numpy(), b.numpy(), C.numpy(), reg, numItermax=1_000_000, stopThr=1e-12)
    assert res.converged and res.iterations <= 1000 and res.plan_error <= 1e-6
    plan = res.plan.numpy()
    assert np.abs(plan - P).sum() <= 1e-6 * np.abs(P).sum()
    value_ref = float((P * C.numpy()).sum())
    assert abs(float(res.value) - value_ref) <= 1e-6 * abs(value_ref)
    assert float((res.plan.sum(1) - a).abs().sum()) <= 1e-6
    assert float((res.plan.sum(0) - b).abs().sum()) <= 1e-6
    # The objective is the entropic cost <P, C> + ε KL(P | a bᵀ), evaluated on POT's plan.
    kl = float((xlogy(P, P) - P * np.log(np.outer(a.numpy(), b.numpy()))).sum())
    assert abs(float(res.objective) - (value_ref + reg * kl)) <= 1e-6 * abs(value_ref + reg * kl)
    # The potentials are normalized: <a, f> = <b, g>.
    assert abs(float((a * res.f).sum() - (b * res.g).sum())) < 1e-9 * max(1.0, float(res.f.abs().max()))


@pytest.mark.parametrize("method", ["absorb", "log"])
@pytest.mark.parametrize(("n", "m", "reg"), [(30, 20, 0.5), (15, 40, 0.1), (25, 25, 1.0), (20, 30, 0.03)])
def test_methods_and_schedules_reach_the_same_plan(n, m, reg, method):
    # Both iteration kernels, with and without ε-scaling and Newton steps, stop at the same fixed point.
    C, a, b = _problem(n, m)
    ref = sinkhorn(C, a, b, reg=reg, tol=1e-12, method="log")
    assert ref.converged
    for kwargs in ({}, {"scaling": None}, {"scaling": None, "newton": False}):
        res = sinkhorn(C, a, b, reg=reg, method=method, max_iter=20_000, **kwargs)
        assert res.converged, kwargs
        assert float((res.plan - ref.plan).abs().sum()) <= 1e-6, kwargs


@pytest.mark.parametrize("method", ["absorb", "log"])
@pytest.mark.parametrize("rel_reg", [0.1, 0.03, 0.01])
def test_stopping_rule_bounds_the_plan_error(rel_reg, method):
    # Issue 21: a marginal-only test stopped with plans 1e-5 away from the solution. The reported bound d must
    # hold entry by entry: |log(P_ij / P*_ij)| <= d, hence |<P - P*, C>| <= (e^d - 1) <P*, |C|>. Plain
    # Sinkhorn (no scaling, no Newton) exercises the rate-based bound on its own.
    C, a, b = _problem(20, 14, seed=5)
    reg = rel_reg * float(C.median())
    ref = sinkhorn(C, a, b, reg=reg, tol=1e-13, max_iter=200_000, method="log", scaling=None, newton=False)
    assert ref.converged
    for tol in (1e-4, 1e-6):
        res = sinkhorn(C, a, b, reg=reg, tol=tol, max_iter=200_000, method=method, scaling=None, newton=False)
        assert res.converged and res.plan_error <= tol
        log_ratio = (res.plan.log() - ref.plan.log()).abs().max()
        assert float(log_ratio) <= 1.5 * res.plan_error + 1e-10
        bound = math.expm1(res.plan_error * 1.5) * float((ref.plan * C.abs()).sum())
        assert abs(float(res.value - ref.value)) <= bound + 1e-12


def test_batched_equals_one_by_one_and_broadcasts_marginals():
    probs = [_problem(12, 9, seed=s) for s in range(3)]
    C = torch.stack([p[0] for p in probs])
    a = torch.stack([p[1] for p in probs])
    res = sinkhorn(C, a, probs[0][2], reg=0.3, tol=1e-12)  # b [m] broadcast over the batch
    assert res.converged and res.plan_error <= 1e-12
    assert res.plan.shape == (3, 12, 9) and res.value.shape == (3,) and res.f.shape == (3, 12)
    for i, (Ci, ai, _) in enumerate(probs):
        one = sinkhorn(Ci, ai, probs[0][2], reg=0.3, tol=1e-12)
        assert one.converged
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
    assert full.converged and reduced.converged
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
        cold = sinkhorn(C, a, b, reg=reg, max_iter=200, method=method, scaling=None, newton=False)  # unconverged
        res32 = sinkhorn(C.float(), a.float(), b.float(), reg=reg, max_iter=200, tol=1e-5, method=method)
    for r in (cold, res32):
        assert torch.isfinite(r.plan).all() and torch.isfinite(r.f).all() and torch.isfinite(r.value)
    # The defaults (ε-scaling with warm starts, Newton steps where Sinkhorn stalls) reach the tiny-ε solution.
    res = sinkhorn(C, a, b, reg=reg, method=method)
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
    assert res.converged
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
    # The stopping rule needs three updates to measure a contraction rate (unless they are at rounding level).
    assert warm.iterations <= 4 and 5 * warm.iterations < cold.iterations
    torch.testing.assert_close(warm.f, cold.f, atol=1e-9, rtol=0)
    from_g = sinkhorn(C, a, b, reg=0.2, tol=1e-11, g0=cold.g)
    assert cold.converged and warm.converged and from_g.converged
    assert from_g.iterations <= 4
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
    with pytest.raises(ValueError, match=r"scaling must be a number in \(0, 1\) or None, got 1\.5"):
        sinkhorn(C, a, b, scaling=1.5)
    with pytest.raises(ValueError, match="reg_start must be a positive number"):
        sinkhorn(C, a, b, reg_start=float("nan"))


def test_sinkhorn_divergence_bad_inputs_name_the_argument():
    # Issue 18: empty or integer samples get one clear error naming the argument.
    x = torch.randn(5, 2, dtype=f64)
    with pytest.raises(ValueError, match=r"x must hold at least one sample, got shape \(0, 2\)"):
        sinkhorn_divergence(x[:0], x)
    with pytest.raises(ValueError, match=r"y must hold at least one sample, got shape \(0, 2\)"):
        sinkhorn_divergence(x, x[:0])
    with pytest.raises(TypeError, match=r"x must be a floating-point tensor, got dtype torch\.int64"):
        sinkhorn_divergence(torch.ones(5, 2, dtype=torch.long), x)
    with pytest.raises(TypeError, match="y must be a floating-point tensor, got list"):
        sinkhorn_divergence(x, [[1.0, 2.0]])
    with pytest.raises(ValueError, match=r"y has samples of shape \(3,\) but x has \(2,\)"):
        sinkhorn_divergence(x, torch.randn(4, 3, dtype=f64))
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x must be finite"):
        sinkhorn_divergence(bad, x)


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
