"""Mixture tools around Normalized Wasserstein (arXiv 1902.00415): adversarial clustering and evaluation.

* :func:`assign_to_generators`: the cluster assignment of *adversarial clustering* — after an NW-GAN with
  ``K`` generators fits a data set (each generator one mixture component, ``π`` their proportions), a
  point belongs to the component whose generator reproduces it best (``argmin_k min_z ||G_k(z) - x||``,
  or the nearest generated sample for low-dimensional data).
* :func:`clustering_accuracy`: accuracy under the best one-to-one matching of clusters to classes.
* :func:`mixture_recovery_errors`: the paper's mixture-of-Gaussians metrics (pi, mean and covariance
  errors) exactly as the authors' evaluation code defines them.
* :func:`kmeans`: scikit-learn's seeded k-means++ / Lloyd, a cheap partition of a pooled sample into components.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.validation import (
    check_choice,
    check_finite,
    check_positive,
    check_positive_int,
    check_probability_vector,
    check_seed,
)

__all__ = ["assign_to_generators", "clustering_accuracy", "kmeans", "mixture_recovery_errors"]


def kmeans(x: torch.Tensor, k: int, n_iter: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means (k-means++ seeding, Lloyd iterations) by scikit-learn's ``KMeans``, deterministic given ``seed``.

    Nothing here needs gradients (it partitions pooled samples and places initial components), so the
    well-kept implementation is used rather than one of our own; it runs in float64 on the CPU and the
    results come back on ``x``'s device.

    Args:
        x: ``[N, ...]`` points (flattened).
        k: number of clusters, ``1 <= k <= N``.
        n_iter: maximum Lloyd iterations.
        seed: seed of the k-means++ draws (``random_state``).

    Returns:
        ``(labels [N], centers [k, D])``; scikit-learn re-seeds empty clusters, so every label in ``0..k-1`` is
        used when ``x`` has at least ``k`` distinct points.

    Raises:
        ValueError: if ``k < 1`` or ``k > N``, or ``x`` holds NaN or inf.
    """
    from sklearn.cluster import KMeans

    check_finite("x", x)
    check_positive_int("k", k)
    check_positive_int("n_iter", n_iter)
    check_seed("seed", seed)
    pts = x.reshape(x.shape[0], -1).detach().double().cpu().numpy()
    n = pts.shape[0]
    if k > n:
        raise ValueError(f"k must be at most the number of points ({n}), got {k}")
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=n_iter, random_state=seed).fit(pts)
    labels = torch.from_numpy(km.labels_.astype("int64")).to(x.device)
    centers = torch.from_numpy(km.cluster_centers_).to(device=x.device, dtype=x.dtype)
    return labels, centers


@torch.no_grad()
def _nearest_sample_distances(x: torch.Tensor, generators: Sequence[nn.Module], latent_dim: int, n_samples: int,
                              generator: torch.Generator | None) -> torch.Tensor:
    out = []
    for g_k in generators:
        z = torch.randn(n_samples, latent_dim, generator=generator, device=x.device)
        samples = g_k(z).reshape(n_samples, -1)
        out.append(torch.cdist(x.reshape(x.shape[0], -1), samples).min(dim=1).values)
    return torch.stack(out, dim=1)


def _projection_distances(x: torch.Tensor, generators: Sequence[nn.Module], latent_dim: int,
                          latent_shape: tuple[int, ...], steps: int, lr: float, restarts: int,
                          generator: torch.Generator | None) -> torch.Tensor:
    n = x.shape[0]
    flat_x = x.reshape(n, -1).detach()
    out = []
    for g_k in generators:
        params = [p.requires_grad for p in g_k.parameters()]
        g_k.requires_grad_(False)
        try:
            z = torch.randn(restarts * n, latent_dim, *latent_shape, generator=generator, device=x.device)
            z.requires_grad_(True)
            opt = torch.optim.Adam([z], lr=lr)
            target = flat_x.repeat(restarts, 1)
            for _ in range(steps):
                loss = (g_k(z).reshape(restarts * n, -1) - target).pow(2).sum(dim=1)
                opt.zero_grad(set_to_none=True)
                loss.sum().backward()
                opt.step()
            with torch.no_grad():
                d = (g_k(z).reshape(restarts * n, -1) - target).pow(2).sum(dim=1).sqrt()
            out.append(d.view(restarts, n).min(dim=0).values)
        finally:
            for p, flag in zip(g_k.parameters(), params):
                p.requires_grad_(flag)
    return torch.stack(out, dim=1)


def assign_to_generators(
    x: torch.Tensor,
    generators: Sequence[nn.Module],
    latent_dim: int,
    method: str = "projection",
    latent_shape: Sequence[int] = (),
    steps: int = 200,
    lr: float = 0.05,
    restarts: int = 4,
    n_samples: int = 4096,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adversarial clustering's assignment: each point goes to the mixture component that explains it best.

    With ``method="projection"`` (the paper's rule) the distance of ``x`` to component ``k`` is
    ``min_z ||G_k(z) - x||_2``, found by Adam on ``z`` from ``restarts`` random starts. Use
    ``method="nearest"`` (distance to the nearest of ``n_samples`` samples of ``G_k``) when generators
    cover the whole space (e.g. affine generators on 2-D data, where every projection distance is 0).
    Generators are put in eval mode for the call and restored afterwards.

    Args:
        x: ``[N, ...]`` points to cluster.
        generators: the ``K`` component generators (e.g. ``NWGAN.components``).
        latent_dim: size of each generator's latent input.
        method: ``"projection"`` or ``"nearest"``.
        latent_shape: trailing latent shape (e.g. ``(1, 1)`` for DCGAN generators).
        steps, lr, restarts: the latent optimisation of ``"projection"``.
        n_samples: generated samples per component for ``"nearest"``.
        generator: random generator of the latent starts / samples.

    Returns:
        ``(labels [N], distances [N, K])``.

    Raises:
        ValueError: on no generators or bad numbers.

    Example:
        >>> labels, dist = assign_to_generators(x, nwgan.components, nwgan.latent_dim)
    """
    check_finite("x", x)
    if len(generators) == 0:
        raise ValueError("generators must hold at least one generator (K >= 1)")
    check_choice("method", method, ("projection", "nearest"))
    check_positive_int("latent_dim", latent_dim)
    check_positive_int("steps", steps)
    check_positive("lr", lr)
    check_positive_int("restarts", restarts)
    check_positive_int("n_samples", n_samples)
    with model_mode(generators, "eval"):
        if method == "nearest":
            dist = _nearest_sample_distances(x, generators, latent_dim, n_samples, generator)
        else:
            with torch.enable_grad():
                dist = _projection_distances(x, generators, latent_dim, tuple(latent_shape), steps, lr, restarts,
                                             generator)
    return dist.argmin(dim=1), dist


def clustering_accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Accuracy of cluster labels under the best one-to-one matching of clusters to classes (Hungarian).

    Clusters left unmatched (more clusters than classes) count as errors.

    Raises:
        ValueError: on different lengths or an empty input.
    """
    from scipy.optimize import linear_sum_assignment

    pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
    if pred.numel() != target.numel() or pred.numel() == 0:
        raise ValueError(f"pred and target must be non-empty and of equal length, got {pred.numel()} and "
                         f"{target.numel()}")
    kp, kt = int(pred.max()) + 1, int(target.max()) + 1
    table = torch.zeros(kp, kt, dtype=torch.long)
    table.index_put_((pred, target), torch.ones_like(pred), accumulate=True)
    rows, cols = linear_sum_assignment(-table.numpy())
    return float(table[rows, cols].sum()) / pred.numel()


def mixture_recovery_errors(samples: torch.Tensor, means: torch.Tensor, covariances: torch.Tensor,
                            proportions: Sequence[float] | torch.Tensor) -> dict[str, float | list[float]]:
    """The NW paper's mixture-of-Gaussians metrics, as defined in the authors' evaluation code.

    Every generated sample is assigned to the nearest true mean (Euclidean). Then

    * ``pi_estimate_k`` = share of samples assigned to mode ``k``;
    * ``pi_error = mean_k (pi_estimate_k - π_k)^2 / mean_k π_k^2`` (relative squared error);
    * ``mean_error = (1/K) Σ_k mean_d (m̂_k - μ_k)_d^2`` over the modes that received samples, ``m̂_k``
      the mean of the samples assigned to mode ``k``;
    * ``cov_error = (1/K) Σ_k mean_{d,e} (Ĉ_k - Σ_k)_{de}^2``, ``Ĉ_k`` their unbiased covariance (modes
      with fewer than two samples are skipped).

    As in the authors' code, modes without samples add nothing to the mean and covariance errors (the pi
    error accounts for them), and the generated samples should come from the model's mixture: component
    ``k`` contributing a share ``π_k`` (e.g. :meth:`NWGAN.sample <lightning_robust.models.NWGAN.sample>`).

    Args:
        samples: ``[N, D]`` generated samples.
        means: ``[K, D]`` true component means.
        covariances: ``[K, D, D]`` true covariances (``std^2 I`` for isotropic components).
        proportions: ``[K]`` true proportions.

    Returns:
        ``{"pi_error", "mean_error", "cov_error", "pi_estimate", "empty_modes"}``.

    Raises:
        ValueError: on inconsistent shapes or proportions.
    """
    check_finite("samples", samples)
    check_finite("means", means)
    check_finite("covariances", covariances)
    check_finite("proportions", proportions)
    pi = check_probability_vector("proportions", proportions)
    means = means.double().cpu()
    k, d = means.shape
    if pi.numel() != k:
        raise ValueError(f"proportions has {pi.numel()} entries but there are {k} means")
    if tuple(covariances.shape) != (k, d, d):
        raise ValueError(f"covariances must have shape {(k, d, d)}, got {tuple(covariances.shape)}")
    x = samples.detach().double().cpu().reshape(samples.shape[0], -1)
    if x.shape[0] == 0 or x.shape[1] != d:
        raise ValueError(f"samples must be [N, {d}] with N > 0, got {tuple(samples.shape)}")
    assign = torch.cdist(x, means).argmin(dim=1)
    counts = torch.bincount(assign, minlength=k).double()
    pi_est = counts / counts.sum()
    pi_error = float(((pi_est - pi) ** 2).mean() / (pi**2).mean())
    mean_error = cov_error = 0.0
    for j in range(k):
        xs = x[assign == j]
        if xs.shape[0] > 0:
            mean_error += float(((xs.mean(dim=0) - means[j]) ** 2).mean())
        if xs.shape[0] > 1:
            cov = torch.cov(xs.T).reshape(d, d)
            cov_error += float(((cov - covariances[j].double().cpu()) ** 2).mean())
    return {"pi_error": pi_error, "mean_error": mean_error / k, "cov_error": cov_error / k,
            "pi_estimate": pi_est.tolist(), "empty_modes": int((counts == 0).sum())}
