"""The exact mixture log-likelihood of benchmarks/bench_nw_gan_recipe.py against torch.distributions."""

import math

import torch

from benchmarks.bench_nw_gan_recipe import _mixture_loglik


def _reference(x: torch.Tensor, pi: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> float:
    comps = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    return float(torch.logsumexp(comps.log_prob(x[:, None, :]) + pi.log(), dim=1).mean())


def _problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(4, 2, 2, generator=g, dtype=torch.float64) * 0.3
    cov = T @ T.transpose(1, 2) + 1e-3 * torch.eye(2, dtype=torch.float64)
    mu = torch.randn(4, 2, generator=g, dtype=torch.float64)
    pi = torch.softmax(torch.randn(4, generator=g, dtype=torch.float64), 0)
    x = torch.randn(300, 2, generator=g, dtype=torch.float64)
    return x, pi, mu, cov


def test_matches_torch_distributions_on_positive_definite_components():
    for seed in range(3):
        x, pi, mu, cov = _problem(seed)
        assert math.isclose(_mixture_loglik(x, pi, mu, cov), _reference(x, pi, mu, cov), rel_tol=1e-12)


def test_closed_form_standard_normal_at_its_mean():
    # log N(0; 0, I_2) = -log(2π).
    x, pi, mu, cov = torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, dtype=torch.float64), \
        torch.zeros(1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)[None]
    assert math.isclose(_mixture_loglik(x, pi, mu, cov), -math.log(2 * math.pi), rel_tol=1e-14)


def test_singular_component_contributes_zero_density_instead_of_raising():
    x, pi, mu, cov = _problem(0)
    singular = cov.clone()
    singular[1] = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)  # rank 1: a collapsed generator
    singular[2] = 0.0  # rank 0: collapsed to a point
    keep = torch.tensor([0, 3])
    # The other components keep their (un-renormalised) weights: the collapsed ones' mass is simply lost.
    expected = _reference(x, pi[keep], mu[keep], cov[keep])
    assert math.isclose(_mixture_loglik(x, pi, mu, singular), expected, rel_tol=1e-12)
    assert _mixture_loglik(x, pi, mu, torch.zeros_like(cov)) == -math.inf
