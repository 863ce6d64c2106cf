"""The entropic-GAN likelihood bound against closed forms of a linear-Gaussian model, quadrature and the
authors' evaluator formula."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_robust.nets import DualCritic
from lightning_robust.ot import (
    SoftCTransform,
    cost_log_normalizer,
    entropic_log_likelihood,
    fit_fake_potential,
    sinkhorn,
)

f64 = torch.float64
K, D, LAM = 2, 3, 0.5


class LinearG(nn.Module):
    """G(z) = A z + b: with a Gaussian latent and the squared-L2 cost the model density is Gaussian."""

    latent_dim = K

    def __init__(self, A: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.A, self.b = nn.Parameter(A), nn.Parameter(b)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.A.T + self.b


class QuadraticD2(nn.Module):
    """D2(ŷ) = ½ ŷᵀ M ŷ + mᵀ ŷ: the bound's q is then Gaussian and the gap KL(q || posterior) is closed-form."""

    def __init__(self, M: torch.Tensor, m: torch.Tensor) -> None:
        super().__init__()
        self.M, self.m = M, m

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((y_hat @ self.M) * y_hat).sum(1) + y_hat @ self.m


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(0)
    A = 0.6 * torch.randn(D, K, generator=g, dtype=f64)
    b = torch.randn(D, generator=g, dtype=f64)
    G = LinearG(A, b)
    # f_Y = N(b, A Aᵀ + λ/2 I): the Gaussian observation model exp(-|y - G(x)|² / λ) has variance λ/2.
    mvn = torch.distributions.MultivariateNormal(b, A @ A.T + LAM / 2 * torch.eye(D, dtype=f64))
    y = mvn.sample((6,))
    latents = torch.randn(200_000, K, generator=g, dtype=f64)
    return G, mvn, y, latents


def _kl_q_posterior(G: LinearG, d2: QuadraticD2, y: torch.Tensor) -> torch.Tensor:
    """KL(q || p(x|y)) with q ∝ N(x; 0, I) exp(-(D2(Ax+b) + |y-Ax-b|²)/λ): both Gaussian in x."""
    A, b = G.A.detach(), G.b.detach()
    out = []
    for yi in y:
        P_p = torch.eye(K, dtype=f64) + 2 / LAM * A.T @ A
        h_p = 2 / LAM * A.T @ (yi - b)
        P_q = P_p + A.T @ d2.M @ A / LAM
        h_q = h_p - A.T @ (d2.M @ b + d2.m) / LAM
        mp, mq = torch.linalg.solve(P_p, h_p), torch.linalg.solve(P_q, h_q)
        kl = 0.5 * (torch.trace(P_p @ torch.linalg.inv(P_q)) + (mp - mq) @ P_p @ (mp - mq) - K
                    + torch.logdet(P_q) - torch.logdet(P_p))
        out.append(kl)
    return torch.stack(out)


def _tol(res) -> torch.Tensor:
    # Importance-sampling error ~ 1/sqrt(ESS); 5 standard errors.
    return 5.0 / res.ess.sqrt()


def test_plain_monte_carlo_equals_closed_form_gaussian(model):
    G, mvn, y, latents = model
    res = entropic_log_likelihood(G, None, y, reg=LAM, cost="l2", latents=latents, chunk_size=30_000)
    assert torch.all((res.log_likelihood - mvn.log_prob(y)).abs() < _tol(res))


def test_bound_is_below_truth_by_the_closed_form_gap(model):
    G, mvn, y, latents = model
    d2 = QuadraticD2(torch.tensor([[0.8, 0.2, 0.0], [0.2, 0.6, 0.0], [0.0, 0.0, 0.4]], dtype=f64),
                     torch.tensor([0.4, -0.6, 0.2], dtype=f64))
    res = entropic_log_likelihood(G, d2, y, reg=LAM, cost="l2", latents=latents, chunk_size=30_000)
    mc = entropic_log_likelihood(G, None, y, reg=LAM, cost="l2", latents=latents, chunk_size=30_000)
    gap = _kl_q_posterior(G, d2, y)
    assert torch.all(gap > 0.01)  # a real gap, so the checks below are not vacuous
    truth = mvn.log_prob(y)
    assert torch.all((res.log_likelihood - (truth - gap)).abs() < _tol(res))
    # A lower bound: below the true log-density by the stated gap (KL(q || posterior) >= 0) ...
    assert torch.all(res.log_likelihood < truth)
    # ... and, on the same latents, never above the plain Monte-Carlo estimate (Jensen, deterministic).
    assert torch.all(res.log_likelihood <= mc.log_likelihood + 1e-12)
    # The Monte-Carlo errors cancel in the difference, which matches the gap tightly.
    assert torch.all(((mc.log_likelihood - res.log_likelihood) - gap).abs() < 0.2 * gap + 1e-3)


def test_critics_forms_are_equivalent_and_d1_does_not_matter(model):
    G, _, y, latents = model
    d2 = QuadraticD2(0.2 * torch.eye(D, dtype=f64), torch.zeros(D, dtype=f64))
    lat = latents[:5000]
    ref = entropic_log_likelihood(G, d2, y, reg=LAM, latents=lat).log_likelihood
    d1a, d1b = nn.Linear(D, 1).double(), nn.Linear(D, 1).double()
    pair = entropic_log_likelihood(G, (d1a, d2), y, reg=LAM, latents=lat).log_likelihood
    dual = entropic_log_likelihood(G, DualCritic(d1b, d2), y, reg=LAM, latents=lat).log_likelihood
    torch.testing.assert_close(pair, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(dual, ref, atol=1e-12, rtol=0)
    # Adding a constant to D2 changes nothing (q and the bound are shift invariant).
    shifted = entropic_log_likelihood(G, lambda t: d2(t) + 7.0, y, reg=LAM, latents=lat).log_likelihood
    torch.testing.assert_close(shifted, ref, atol=1e-10, rtol=0)


def test_chunking_and_batching_do_not_change_the_result(model):
    G, _, y, latents = model
    d2 = QuadraticD2(0.3 * torch.eye(D, dtype=f64), 0.1 * torch.ones(D, dtype=f64))
    lat = latents[:3001]
    a = entropic_log_likelihood(G, d2, y, reg=LAM, latents=lat, chunk_size=5000, batch_size=64)
    b = entropic_log_likelihood(G, d2, y, reg=LAM, latents=lat, chunk_size=97, batch_size=2)
    for name in ("log_likelihood", "expected_cost", "ess"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-10, rtol=1e-10)


def test_authors_estimator_equals_their_evaluator_formula(model):
    """evaluator.py: prob ∝ exp(-|x|²/2) exp(v/λ), v = D1(y) - D2(ŷ) - ℓ,
    LL = -(1/λ)(Σ p ℓ - λ H(p)) + Σ p (-|x|²/2)."""
    G, _, y, latents = model
    d1 = nn.Linear(D, 1).double()
    d2 = QuadraticD2(0.3 * torch.eye(D, dtype=f64), 0.1 * torch.ones(D, dtype=f64))
    x = latents[:640]
    ours = entropic_log_likelihood(G, (d1, d2), y, reg=LAM, cost="l1", latents=x, estimator="authors")
    with torch.no_grad():
        y_hat = G(x)
        for i, yi in enumerate(y):
            c = (yi[None] - y_hat).abs().sum(1)
            v = (d1(yi[None]).squeeze() - d2(y_hat) - c) / LAM
            v = v - v.max()
            prob = torch.exp(-0.5 * (x**2).sum(1)) * torch.exp(v)
            prob = prob / prob.sum()
            ent = -(prob * torch.log(prob + 1e-300)).sum()
            ll = (-1 / LAM) * ((c * prob).sum() - LAM * ent) + ((-0.5 * (x**2).sum(1)) * prob).sum()
            assert abs(float(ours.log_likelihood[i]) - float(ll)) < 1e-9


def test_l1_laplace_model_against_quadrature():
    # 1-D latent, 1-D data: f_Y(y) = ∫ N(z) (1/2λ) exp(-|y - a z - b| / λ) dz, by the trapezoid rule.
    a, b, lam = 0.8, 0.3, 0.4
    G = LinearG(torch.tensor([[a]], dtype=f64), torch.tensor([b], dtype=f64))
    G.latent_dim = 1
    y = torch.tensor([[-1.0], [0.2], [1.5]], dtype=f64)
    z = torch.linspace(-12, 12, 400_001, dtype=f64)
    dens = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    truth = torch.stack([torch.trapezoid(dens * torch.exp(-(yi - a * z - b).abs() / lam) / (2 * lam), z).log()
                         for yi in y[:, 0]])
    lat = torch.randn(400_000, 1, generator=torch.Generator().manual_seed(5), dtype=f64)
    res = entropic_log_likelihood(G, None, y, reg=lam, cost="l1", latents=lat, chunk_size=100_000)
    assert torch.all((res.log_likelihood - truth).abs() < _tol(res))


@pytest.mark.parametrize(("cost", "dim"), [("l2", 1), ("l2", 2), ("l1", 1), ("l1", 2)])
def test_cost_log_normalizer_integrates_to_one(cost, dim):
    lam = 0.7
    t = torch.linspace(-15, 15, 1501, dtype=f64)
    grid = torch.stack(torch.meshgrid(*([t] * dim), indexing="ij"), -1).reshape(-1, dim)
    ell = (grid**2).sum(1) if cost == "l2" else grid.abs().sum(1)
    mass = torch.exp(cost_log_normalizer(cost, dim, lam) - ell / lam).sum() * float(t[1] - t[0]) ** dim
    assert abs(float(mass) - 1.0) < 5e-4  # quadrature error O(h²); a wrong constant is off by O(1)


def test_sinkhorn_potential_is_a_soft_c_transform_and_tightens_the_bound(model):
    G, mvn, _, _ = model
    torch.manual_seed(0)
    data = mvn.sample((600,))
    lam = LAM
    d2 = fit_fake_potential(G, data, n_latents=600, reg=lam, cost="l2", seed=3, tol=1e-11)
    assert isinstance(d2, SoftCTransform)
    # On the generated samples of the fit, D2 = -g (the Sinkhorn fixed point), up to the gauge constant.
    z = torch.randn(600, K, generator=torch.Generator().manual_seed(3), dtype=f64)
    res = sinkhorn(torch.cdist(data, G(z).detach()) ** 2, reg=lam, tol=1e-11, max_iter=5000)
    diff = d2(G(z).detach()) + res.g
    assert float(diff.std()) < 1e-6
    # The data follow the model, so the optimal D2 is (nearly) constant and the bound nearly tight:
    # much tighter than with an arbitrary quadratic D2.
    y = mvn.sample((50,))
    lat = torch.randn(20_000, K, generator=torch.Generator().manual_seed(9), dtype=f64)
    mc = entropic_log_likelihood(G, None, y, reg=lam, latents=lat).log_likelihood
    sk = entropic_log_likelihood(G, d2, y, reg=lam, latents=lat).log_likelihood
    bad = entropic_log_likelihood(G, QuadraticD2(torch.eye(D, dtype=f64), torch.ones(D, dtype=f64)), y,
                                  reg=lam, latents=lat).log_likelihood
    assert torch.all(sk <= mc + 1e-12)
    assert float((mc - sk).mean()) < 0.1 < float((mc - bad).mean())


def test_restores_training_flags_and_validates_inputs(model):
    G, _, y, _ = model
    gen = nn.Sequential(nn.Linear(K, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, D)).double().train()
    res = entropic_log_likelihood(gen, None, y, reg=LAM, latent_dim=K, n_latents=256)
    assert res.log_likelihood.shape == (6,) and all(m.training for m in gen.modules())
    again = entropic_log_likelihood(gen, None, y, reg=LAM, latent_dim=K, n_latents=256)
    torch.testing.assert_close(res.log_likelihood, again.log_likelihood)  # eval mode + seeded latents
    with pytest.raises(ValueError, match="reg must be a positive number"):
        entropic_log_likelihood(G, None, y, reg=0.0)
    with pytest.raises(ValueError, match="cost must be one of"):
        entropic_log_likelihood(G, None, y, cost="cosine")
    with pytest.raises(ValueError, match="latent_dim must be given"):
        entropic_log_likelihood(lambda z: z, None, y)
    with pytest.raises(ValueError, match="y contains NaN"):
        entropic_log_likelihood(G, None, torch.full((2, D), float("nan"), dtype=f64))
    with pytest.raises(ValueError, match="critics must be None"):
        entropic_log_likelihood(G, 3.0, y)
    with pytest.raises(ValueError, match=r"latents must have shape \[n, 2\]"):
        entropic_log_likelihood(G, None, y, latents=torch.randn(5, 3, dtype=f64))
    with pytest.raises(ValueError, match="estimator must be one of"):
        entropic_log_likelihood(G, None, y, estimator="upper")
    assert np.isfinite(res.ess.numpy()).all()
