"""Normalized Wasserstein: the dual against closed forms and POT, the primal solver against an LP, π on the simplex."""

import numpy as np
import ot as pot
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from lightning_robust.ot import (
    MixtureProportions,
    class_mixture_weights,
    estimate_normalized_wasserstein,
    mixture_expectation,
    normalized_wasserstein,
    normalized_wasserstein_sinkhorn,
    sample_mixture,
)
from lightning_robust.ot.normalized_wasserstein import _nw_sinkhorn_cost, _pairwise_cost

MEANS = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])


pytestmark = pytest.mark.usefixtures("one_thread")


def _components(m: int, g: torch.Generator, std: float = 0.3) -> list[torch.Tensor]:
    return [mu + std * torch.randn(m, 2, generator=g) for mu in MEANS]


def _critic() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))


def test_nw_at_true_proportions_is_the_plain_wasserstein_dual():
    # Components sampled in exact proportion (50/30/20): Σ_k π_k mean_k f is the mean over the pooled sample,
    # so the NW objective with π fixed to the truth is the plain dual E_X f - E_mixture f, for any critic.
    g = torch.Generator().manual_seed(0)
    pi = torch.tensor([0.5, 0.3, 0.2])
    comps = [mu + 0.3 * torch.randn(n, 2, generator=g) for mu, n in zip(MEANS, (50, 30, 20))]
    target = torch.randn(40, 2, generator=g) * 2
    critic = _critic()
    pooled = torch.cat(comps)
    plain = critic(target).mean() - critic(pooled).mean()
    nw_list = normalized_wasserstein(critic(target), [critic(c) for c in comps], pi)
    labels = torch.cat([torch.full((len(c),), k) for k, c in enumerate(comps)])
    nw_labels = normalized_wasserstein(critic(target), critic(pooled), pi, labels=labels)
    assert torch.allclose(nw_list, plain, atol=1e-6) and torch.allclose(nw_labels, plain, atol=1e-6)


def _optimal_critic_1d(x: np.ndarray, y: np.ndarray):
    """The 1-Lipschitz f maximising E_x f - E_y f in 1-D: f' = sign(F_y - F_x) (exact on the sample points)."""
    grid = np.unique(np.concatenate([x, y]))
    fx = np.searchsorted(np.sort(x), grid, side="right") / len(x)
    fy = np.searchsorted(np.sort(y), grid, side="right") / len(y)
    slope = np.sign(fy - fx)[:-1]
    values = np.concatenate([[0.0], np.cumsum(slope * np.diff(grid))])
    return lambda t: torch.as_tensor(np.interp(t.numpy().ravel(), grid, values), dtype=torch.float64)


def test_nw_dual_at_the_optimal_critic_equals_pot_wasserstein_1d():
    g = torch.Generator().manual_seed(3)
    counts = (60, 30, 10)
    comps = [mu + 0.4 * torch.randn(n, generator=g, dtype=torch.float64) for mu, n in zip((0.0, 2.0, 5.0), counts)]
    pi = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    target = torch.cat([torch.randn(70, generator=g, dtype=torch.float64) * 0.5 + 1.0,
                        torch.randn(30, generator=g, dtype=torch.float64) + 4.0])
    pooled = torch.cat(comps)
    f = _optimal_critic_1d(target.numpy(), pooled.numpy())
    nw = normalized_wasserstein(f(target), [f(c) for c in comps], pi)
    w1 = pot.emd2_1d(target.numpy(), pooled.numpy(), metric="euclidean")
    assert float(nw) == pytest.approx(w1, rel=1e-9, abs=1e-9)


def test_mixture_weights_match_stratified_means_and_renormalise_absent_classes():
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 2, 2, 2, 0, 2])  # class 1 absent
    values = torch.randn(7, generator=g)
    pi = torch.tensor([0.2, 0.5, 0.3])
    w = class_mixture_weights(labels, pi)
    expected = (0.2 * values[labels == 0].mean() + 0.3 * values[labels == 2].mean()) / 0.5
    assert torch.allclose((w * values).sum(), expected) and torch.allclose(w.sum(), torch.tensor(1.0))
    assert torch.allclose(mixture_expectation(values, pi, labels), expected)


def test_sample_mixture_frequencies_follow_proportions():
    g = torch.Generator().manual_seed(0)
    comp_samples = torch.arange(3.0)[:, None, None].expand(3, 20000, 1)  # component k's samples are all k
    pi = torch.tensor([0.6, 0.3, 0.1])
    samples, comp = sample_mixture(comp_samples, pi, generator=g)
    freq = torch.bincount(comp, minlength=3).double() / comp.numel()
    assert torch.equal(samples[:, 0], comp.float())
    assert torch.allclose(freq, pi.double(), atol=0.015)  # ~4.5 standard errors at n = 20000


def test_proportions_stay_on_the_simplex_under_any_updates():
    pi = MixtureProportions(4, [0.7, 0.1, 0.2, 0.0])
    assert torch.allclose(pi.proportions, torch.tensor([0.7, 0.1, 0.2, 0.0]), atol=1e-6)
    opt = torch.optim.SGD(pi.parameters(), lr=50.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        loss = (pi() * torch.randn(4, generator=g) * 100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        p = pi.proportions
        assert (p >= 0).all() and float(p.sum()) == pytest.approx(1.0, abs=1e-6)
    fixed = MixtureProportions(3, learnable=False)
    assert list(fixed.parameters()) == [] and torch.allclose(fixed(), torch.full((3,), 1 / 3))


def _lp_nw(x: torch.Tensor, comps: list[torch.Tensor]) -> tuple[float, np.ndarray]:
    """Exact min_π W1(x, Σ π_k U(comp_k)) by linear programming over (plan, π)."""
    support = torch.cat(comps)
    lab = np.concatenate([[k] * len(c) for k, c in enumerate(comps)])
    cost = torch.cdist(x.double(), support.double()).numpy()
    n, m, k = len(x), len(support), len(comps)
    a_eq, b_eq = [], []
    for i in range(n):
        row = np.zeros(n * m + k)
        row[i * m:(i + 1) * m] = 1
        a_eq.append(row)
        b_eq.append(1 / n)
    sizes = np.bincount(lab)
    for j in range(m):
        row = np.zeros(n * m + k)
        row[j:n * m:m] = 1
        row[n * m + lab[j]] = -1 / sizes[lab[j]]
        a_eq.append(row)
        b_eq.append(0.0)
    res = linprog(np.concatenate([cost.ravel(), np.zeros(k)]), A_eq=np.array(a_eq), b_eq=np.array(b_eq),
                  bounds=(0, None), method="highs")
    return float(res.fun), res.x[-k:]


def test_sinkhorn_nw_matches_linear_program_and_pot():
    g = torch.Generator().manual_seed(0)
    comps = _components(25, g)
    true_pi = torch.tensor([0.6, 0.3, 0.1])
    x = torch.cat([mu + 0.3 * torch.randn(round(40 * p), 2, generator=g) for mu, p in zip(MEANS, true_pi.tolist())])
    lp_value, lp_pi = _lp_nw(x, comps)
    res = normalized_wasserstein_sinkhorn(x, comps, reg=0.005, max_iter=5000, tol=1e-9)
    assert torch.allclose(res.proportions, torch.as_tensor(lp_pi), atol=1e-3)
    assert float(res.value) == pytest.approx(lp_value, rel=0.03)
    assert float(res.plan.sum()) == pytest.approx(1.0, abs=1e-6)
    # π fixed: plain entropic OT to that mixture, i.e. POT's Sinkhorn plan.
    fixed = normalized_wasserstein_sinkhorn(x, comps, proportions=true_pi, reg=0.05, max_iter=5000, tol=1e-10)
    support = torch.cat(comps)
    cost = torch.cdist(x.double(), support.double()).numpy()
    b = np.repeat(true_pi.double().numpy() / 25, 25)
    plan = pot.sinkhorn(np.full(len(x), 1 / len(x)), b, cost, 0.05 * cost.mean(), numItermax=20000, stopThr=1e-12)
    assert float(fixed.value) == pytest.approx(float((plan * cost).sum()), rel=1e-6)
    # Optimising π can only lower the cost, and here it recovers the target's proportions.
    assert float(res.value) < float(normalized_wasserstein_sinkhorn(x, comps, proportions=[1 / 3] * 3, reg=0.005,
                                                                    max_iter=5000).value)


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-pi", "nw"])
def test_scaling_path_matches_log_domain_where_the_kernel_underflows(fixed):
    # ε = 3e-3 x mean cost: exp(-C/ε) underflows to 0 on a whole row, so the scaling-vector path must absorb
    # its vectors into stabilised potentials (and repair underflowed rows in the log domain). Both paths
    # solve the same problem to tol 1e-12; their plans, values and proportions must agree to rounding.
    g = torch.Generator().manual_seed(3)
    x = torch.cat([mu + 0.4 * torch.randn(n, 2, generator=g) for mu, n in zip(MEANS, (20, 12, 8))]
                  + [torch.tensor([[9.0, -4.0]])]).double()  # an outlier: its whole kernel row underflows
    comps = [mu + 0.4 * torch.randn(m, 2, generator=g) for mu, m in zip(MEANS, (9, 14, 11))]
    support = torch.cat(comps).double()
    groups = torch.cat([torch.full((len(c),), i) for i, c in enumerate(comps)])
    cost = _pairwise_cost(x, support, 1)
    eps = 3e-3 * float(cost.mean())
    assert bool((torch.exp(-(cost - cost.min()) / eps).sum(dim=1) == 0).any())  # so the kernel alone fails
    pi = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64) if fixed else None
    fast = _nw_sinkhorn_cost(cost[None], groups, 3, pi, eps, 50_000, 1e-12)
    ref = _nw_sinkhorn_cost(cost[None], groups, 3, pi, eps, 50_000, 1e-12, method="log")
    assert fast.iterations < 50_000 and ref.iterations < 50_000
    assert torch.allclose(fast.plan, ref.plan, rtol=0, atol=1e-10)
    assert float(fast.value) == pytest.approx(float(ref.value), rel=1e-10)
    assert torch.allclose(fast.proportions, ref.proportions, rtol=0, atol=1e-10)
    assert float((fast.plan[0].sum(1) - 1 / len(x)).abs().sum()) < 1e-12
    with pytest.raises(ValueError, match="method"):
        _nw_sinkhorn_cost(cost[None], groups, 3, pi, eps, 10, 1e-6, method="kernel")


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-pi", "nw"])
def test_scaling_path_restarts_stabilised_when_a_scaling_leaves_the_float_range(fixed):
    # In float32 the unclamped kernel path is taken for a cost range below 500 ε, yet exp(-C/ε) underflows
    # to 0 once C/ε passes ~104: an outlier's whole kernel row is zero, its row scaling becomes inf, and the
    # first convergence test sees a non-finite error. The solver must then start again stabilised and reach
    # the log-domain solution, not return NaN.
    g = torch.Generator().manual_seed(4)
    x = torch.cat([mu + 0.4 * torch.randn(n, 2, generator=g) for mu, n in zip(MEANS, (10, 7, 5))]
                  + [torch.tensor([[9.0, -4.0]])])
    comps = [mu + 0.4 * torch.randn(m, 2, generator=g) for mu, m in zip(MEANS, (6, 8, 7))]
    support = torch.cat(comps)
    groups = torch.cat([torch.full((len(c),), i) for i, c in enumerate(comps)])
    cost = torch.cdist(x, support)  # float32
    eps = float(cost.max() - cost.min()) / 200  # range 200 ε: below the stabilisation threshold
    assert bool((torch.exp(-(cost - cost.min()) / eps).sum(dim=1) == 0).any())  # the outlier's row underflows
    pi = torch.tensor([0.5, 0.3, 0.2]) if fixed else None
    fast = _nw_sinkhorn_cost(cost[None], groups, 3, pi, eps, 20_000, 1e-5)
    ref = _nw_sinkhorn_cost(cost[None].double(), groups, 3, None if pi is None else pi.double(), eps, 20_000,
                            1e-10, method="log")
    assert bool(torch.isfinite(fast.plan).all())
    assert torch.allclose(fast.plan.double(), ref.plan, rtol=0, atol=1e-5)
    assert float(fast.value) == pytest.approx(float(ref.value), rel=1e-4)
    assert torch.allclose(fast.proportions.double(), ref.proportions, rtol=0, atol=1e-4)


@pytest.mark.parametrize("rel_reg", [0.05, 0.003], ids=["plain-kernel", "stabilised"])
def test_batched_scaling_path_matches_log_domain(rel_reg):
    # The two-sample test solves a batch of problems at once (bmm into buffers); each must be the log-domain
    # solution of its own problem.
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 12, 2, generator=g, dtype=torch.float64) * 1.5
    support = torch.cat([mu + 0.4 * torch.randn(6, 2, generator=g) for mu in MEANS]).double()
    groups = torch.arange(3).repeat_interleave(6)
    cost = torch.stack([_pairwise_cost(xi, support, 1) for xi in x])
    eps = rel_reg * float(cost.mean())
    assert (float(cost.max() - cost.min()) / eps >= 500) == (rel_reg < 0.01)  # which path runs
    fast = _nw_sinkhorn_cost(cost, groups, 3, None, eps, 50_000, 1e-12)
    ref = _nw_sinkhorn_cost(cost, groups, 3, None, eps, 50_000, 1e-12, method="log")
    assert torch.allclose(fast.plan, ref.plan, rtol=0, atol=1e-10)
    assert torch.allclose(fast.value, ref.value, rtol=1e-10, atol=0)
    for i in range(3):  # and batching changes nothing
        one = _nw_sinkhorn_cost(cost[i:i + 1], groups, 3, None, eps, 50_000, 1e-12)
        assert torch.allclose(one.plan[0], fast.plan[i], rtol=0, atol=1e-10)


def test_nw_is_small_where_w_is_large_for_reweighted_mixtures():
    g = torch.Generator().manual_seed(1)
    comps = _components(60, g)
    pi_x, pi_y = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.2, 0.7])
    x = torch.cat([mu + 0.3 * torch.randn(round(100 * p), 2, generator=g) for mu, p in zip(MEANS, pi_x.tolist())])
    y = torch.cat([mu + 0.3 * torch.randn(round(100 * p), 2, generator=g) for mu, p in zip(MEANS, pi_y.tolist())])
    w = pot.emd2(np.full(100, 0.01), np.full(100, 0.01), torch.cdist(x, y).double().numpy())
    nw = normalized_wasserstein_sinkhorn(x, comps).value + normalized_wasserstein_sinkhorn(y, comps).value
    assert w > 1.5 and float(nw) < 0.25 * w


@pytest.mark.slow
def test_adversarial_estimate_recovers_proportions():
    g = torch.Generator().manual_seed(2)
    comps = _components(500, g, std=0.2)
    pi_true = torch.tensor([0.6, 0.3, 0.1])
    idx = torch.multinomial(pi_true, 1000, replacement=True, generator=g)
    x = MEANS[idx] + 0.2 * torch.randn(1000, 2, generator=g)
    nw = estimate_normalized_wasserstein(x, comps, steps=600, batch_size=128, proportions_lr=5e-2, seed=0)
    w = estimate_normalized_wasserstein(x, comps, learn_proportions=False, steps=600, batch_size=128, seed=0)
    assert torch.allclose(nw.proportions, pi_true, atol=0.1)
    assert nw.value < 0.5 * w.value


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="num_components must be a positive integer, got 0"):
        MixtureProportions(0)
    with pytest.raises(ValueError, match="proportions must be non-negative"):
        MixtureProportions(2, [1.2, -0.2])
    with pytest.raises(ValueError, match="proportions must sum to one"):
        MixtureProportions(2, [0.5, 0.6])
    with pytest.raises(ValueError, match="proportions must have num_components = 3 entries, got 2"):
        MixtureProportions(3, [0.5, 0.5])
    with pytest.raises(ValueError, match="proportions has 2 entries but there are 3 components"):
        normalized_wasserstein(torch.zeros(4), torch.zeros(3, 5), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.1"):
        class_mixture_weights(torch.tensor([0, 2]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="one score per target sample"):
        normalized_wasserstein(torch.zeros(4, 2), torch.zeros(2, 5), torch.tensor([0.5, 0.5]))
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"x has samples of shape \(3,\) but the components have \(2,\)"):
        normalized_wasserstein_sinkhorn(torch.zeros(5, 3), _components(4, g))
    with pytest.raises(ValueError, match=r"components\[1\] has samples of shape \(3,\), target has \(2,\)"):
        estimate_normalized_wasserstein(torch.zeros(5, 2), [torch.zeros(4, 2), torch.zeros(4, 3)], steps=1)
    with pytest.raises(ValueError, match="components must hold at least one sample set"):
        normalized_wasserstein_sinkhorn(torch.zeros(5, 2), [])
