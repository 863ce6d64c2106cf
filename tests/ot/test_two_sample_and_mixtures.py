"""NW two-sample test, k-means, clustering accuracy, generator assignment and the MoG metrics."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from lightning_robust.datamodules import grid_mixture
from lightning_robust.ot import (
    assign_to_generators,
    clustering_accuracy,
    kmeans,
    mixture_recovery_errors,
    nw_two_sample_test,
)

CENTERS = grid_mixture(2, 3.0)  # 4 modes


pytestmark = pytest.mark.usefixtures("one_thread")


def _draw(pi, n, g, shift=0.0):
    comp = torch.multinomial(torch.tensor(pi), n, replacement=True, generator=g)
    return CENTERS[comp] + 0.25 * torch.randn(n, 2, generator=g) + shift, comp


@pytest.mark.slow
def test_nw_test_accepts_reweighted_mixtures_and_rejects_new_components():
    g = torch.Generator().manual_seed(0)
    x, _ = _draw([0.55, 0.25, 0.15, 0.05], 120, g)
    y, _ = _draw([0.05, 0.15, 0.25, 0.55], 120, g)
    shifted, _ = _draw([0.05, 0.15, 0.25, 0.55], 120, g, shift=torch.tensor([1.5, 0.0]))
    same = nw_two_sample_test(x, y, components=4, n_permutations=39)
    w = nw_two_sample_test(x, y, statistic="w", n_permutations=39)
    other = nw_two_sample_test(x, shifted, components=4, n_permutations=39)
    assert same.p_value > 0.2          # same components: NW does not reject ...
    assert w.p_value == pytest.approx(1 / 40)  # ... W rejects at the smallest attainable p
    assert other.p_value == pytest.approx(1 / 40)  # different components: NW rejects
    # The fitted proportions of the shared components are X's and Y's (k-means numbers clusters arbitrarily).
    order = torch.tensor([int(same.component_labels[:120][same.component_labels[:120] == j].numel()) for j in range(4)])
    assert torch.allclose(same.proportions_x, order / 120.0, atol=0.02)
    assert same.null_statistics.shape == (39,)


def test_p_value_is_the_permutation_rank():
    g = torch.Generator().manual_seed(1)
    x, _ = _draw([0.25] * 4, 30, g)
    y, _ = _draw([0.25] * 4, 30, g)
    res = nw_two_sample_test(x, y, components=4, n_permutations=19, max_iter=200)
    rank = int((res.null_statistics >= res.statistic - 1e-6).sum())
    assert res.p_value == pytest.approx((1 + rank) / 20, abs=1e-9)


def test_kmeans_and_clustering_accuracy():
    g = torch.Generator().manual_seed(0)
    x, comp = _draw([0.4, 0.3, 0.2, 0.1], 400, g)
    labels, centers = kmeans(x, 4, seed=0)
    assert clustering_accuracy(labels, comp) == 1.0
    assert torch.cdist(centers, CENTERS).min(dim=1).values.max() < 0.1
    # Against brute force over all matchings.
    pred = torch.randint(0, 3, (50,), generator=g)
    true = torch.randint(0, 3, (50,), generator=g)
    best = max(sum(int(p) == perm[int(t)] for p, t in zip(pred, true)) for perm in itertools.permutations(range(3)))
    assert clustering_accuracy(pred, true) == pytest.approx(best / 50)


class _Shift(nn.Module):
    def __init__(self, mu: torch.Tensor) -> None:
        super().__init__()
        self.mu = nn.Parameter(mu.clone())

    def forward(self, z):
        return 0.1 * z + self.mu


def test_assign_to_generators_by_projection_and_nearest_sample():
    gens = [_Shift(mu) for mu in CENTERS]
    g = torch.Generator().manual_seed(0)
    x, comp = _draw([0.25] * 4, 40, g)
    for method in ("projection", "nearest"):
        labels, dist = assign_to_generators(x, gens, latent_dim=2, method=method, steps=100, restarts=2,
                                            n_samples=500, generator=torch.Generator().manual_seed(0))
        assert torch.equal(labels, comp) and dist.shape == (40, 4)
    assert all(p.requires_grad for gen in gens for p in gen.parameters())
    with pytest.raises(ValueError, match="method must be one of"):
        assign_to_generators(x, gens, latent_dim=2, method="kmeans")


def _authors_metrics(samples, means, covs, pi):
    """A NumPy transcription of the authors' evaluate(): nearest-mean assignment, then the three errors."""
    d = ((samples[:, None, :] - means[None]) ** 2).sum(-1)
    a = d.argmin(1)
    k = len(means)
    pi_est = np.array([np.sum(a == j) / len(a) for j in range(k)])
    pi_err = np.mean((pi_est - pi) ** 2) / np.mean(pi**2)
    me = ce = 0.0
    for j in range(k):
        s = samples[a == j]
        if len(s) > 0:
            me += np.mean((s.mean(0) - means[j]) ** 2)
        if len(s) > 1:
            ce += np.mean((np.cov(s.T) - covs[j]) ** 2)
    return pi_err, me / k, ce / k


def test_mixture_recovery_errors_match_the_authors_definition():
    g = torch.Generator().manual_seed(0)
    pi = np.array([0.5, 0.3, 0.2, 0.0])
    samples, _ = _draw([0.2, 0.2, 0.3, 0.3], 300, g)
    covs = np.stack([np.eye(2) * 0.0625] * 4)
    out = mixture_recovery_errors(samples, CENTERS, torch.as_tensor(covs), pi)
    ref = _authors_metrics(samples.double().numpy(), CENTERS.double().numpy(), covs, pi)
    assert (out["pi_error"], out["mean_error"], out["cov_error"]) == pytest.approx(ref, rel=1e-9)
    exact, _ = _draw([0.5, 0.3, 0.2, 0.0], 20000, g)
    good = mixture_recovery_errors(exact, CENTERS, torch.as_tensor(covs), pi)
    assert good["pi_error"] < 1e-3 and good["mean_error"] < 1e-3 and good["cov_error"] < 1e-4
    assert good["empty_modes"] == 1
    with pytest.raises(ValueError, match="proportions has 3 entries but there are 4 means"):
        mixture_recovery_errors(samples, CENTERS, torch.as_tensor(covs), [0.5, 0.3, 0.2])


def _lloyd_reference(x: torch.Tensor, k: int, seed: int) -> float:
    """The inertia of the hand-written k-means++ / Lloyd that kmeans used before scikit-learn (a reference)."""
    pts = x.double()
    g = torch.Generator().manual_seed(seed)
    centers = pts[torch.randint(0, len(pts), (1,), generator=g)]
    for _ in range(1, k):
        d2 = torch.cdist(pts, centers).pow(2).min(dim=1).values
        centers = torch.cat([centers, pts[torch.multinomial(d2 / d2.sum(), 1, generator=g)]])
    for _ in range(100):
        labels = torch.cdist(pts, centers).argmin(dim=1)
        centers = torch.stack([pts[labels == j].mean(0) if (labels == j).any() else centers[j] for j in range(k)])
    return float(torch.cdist(pts, centers).pow(2).min(dim=1).values.sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_cluster_quality_matches_scikit_learn_and_the_former_torch_lloyd(seed):
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(seed)
    x, _ = _draw([0.4, 0.3, 0.2, 0.1], 300, g)
    labels, centers = kmeans(x, 4, seed=seed)
    inertia = float(((x.double() - centers.double()[labels]) ** 2).sum())
    best_of_10 = KMeans(n_clusters=4, n_init=10, random_state=seed).fit(x.double().numpy()).inertia_
    assert inertia == pytest.approx(best_of_10, rel=1e-3)  # well-separated blobs: every start finds the optimum
    assert inertia <= _lloyd_reference(x, 4, seed) * (1 + 1e-3)
    assert sorted(torch.bincount(labels, minlength=4).tolist())[0] > 0
    assert labels.dtype == torch.long and centers.dtype == x.dtype
