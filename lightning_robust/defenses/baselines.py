"""The baseline poison filters that Peri et al. (arXiv 1909.13374) compare the Deep k-NN filter against.

All three work per class in feature space and share the signature of :func:`deep_knn_filter`
(``features, labels -> keep mask``), so the callback and the fidelity script can swap them freely:

* :func:`l2_outlier_filter` — the L2 outlier defence (Koh et al.; Steinhardt et al.): drop the fraction of
  each class that lies farthest from the class centroid.
* :func:`one_class_svm_filter` — a one-class SVM (scikit-learn, RBF kernel) fitted to each class; points it
  marks as outliers are dropped.
* :func:`random_eviction` — drop a random fraction of each class (how much a filter beats chance).
"""

from __future__ import annotations

import torch

from lightning_robust.defenses.deep_knn import check_features_labels
from lightning_robust.utils.validation import check_choice, check_fraction, check_positive

__all__ = ["l2_outlier_filter", "one_class_svm_filter", "random_eviction"]


def _per_class_count(n_c: int, fraction: float) -> int:
    return round(fraction * n_c)


def l2_outlier_filter(features: torch.Tensor, labels: torch.Tensor, fraction: float = 0.05) -> torch.Tensor:
    """L2 outlier defence: in every class, remove the ``round(fraction * n_c)`` points farthest (Euclidean)
    from the class centroid ``mu_c = mean{ f_i : y_i = c }``.

    Args:
        features: ``[n, d]`` features.
        labels: ``[n]`` integer labels.
        fraction: share of each class to remove, in [0, 1).

    Returns:
        BoolTensor ``[n]`` (``True`` = keep), on the features' device. Among equal distances the point
        with the lower index is removed first.

    Raises:
        ValueError: on mismatched lengths or a fraction outside [0, 1).

    Example:
        >>> keep = l2_outlier_filter(features, labels, fraction=0.05)
    """
    features, labels = check_features_labels(features, labels)
    check_fraction("fraction", fraction)
    keep = torch.ones(labels.shape[0], dtype=torch.bool, device=features.device)
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten().to(features.device)
        m = _per_class_count(members.numel(), fraction)
        if m == 0:
            continue
        f = features[members]
        dist = (f - f.mean(0, keepdim=True)).norm(dim=1)
        far = torch.sort(dist, descending=True, stable=True).indices[:m]
        keep[members[far]] = False
    return keep


def one_class_svm_filter(
    features: torch.Tensor,
    labels: torch.Tensor,
    nu: float = 0.05,
    kernel: str = "rbf",
    gamma: str | float = "scale",
) -> torch.Tensor:
    """One-class SVM defence: fit ``sklearn.svm.OneClassSVM`` to each class's features and remove the
    points it predicts to be outliers (``predict == -1``).

    Args:
        features: ``[n, d]`` features.
        labels: ``[n]`` integer labels.
        nu: the SVM's upper bound on the fraction of training outliers per class, in (0, 1].
        kernel: ``"rbf"`` (default), ``"linear"``, ``"poly"`` or ``"sigmoid"``.
        gamma: kernel coefficient, ``"scale"`` (scikit-learn's default), ``"auto"`` or a positive number.

    Returns:
        BoolTensor ``[n]`` (``True`` = keep) on the features' device. A class with a single point is kept.

    Raises:
        ValueError: on mismatched lengths, ``nu`` outside (0, 1] or an unknown kernel.

    Example:
        >>> keep = one_class_svm_filter(features, labels, nu=0.05)
    """
    from sklearn.svm import OneClassSVM

    features, labels = check_features_labels(features, labels)
    check_fraction("nu", nu, inclusive_low=False, inclusive_high=True)
    check_choice("kernel", kernel, ("rbf", "linear", "poly", "sigmoid"))
    if isinstance(gamma, str):
        check_choice("gamma", gamma, ("scale", "auto"))
    else:
        check_positive("gamma", gamma)
    x = features.detach().double().cpu().numpy()
    y = labels.cpu()
    keep = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    for c in torch.unique(y).tolist():
        members = (y == c).nonzero().flatten()
        if members.numel() < 2:
            continue
        svm = OneClassSVM(nu=nu, kernel=kernel, gamma=gamma).fit(x[members.numpy()])
        keep[members] = torch.as_tensor(svm.predict(x[members.numpy()]) == 1)
    return keep.to(features.device)


def random_eviction(
    features: torch.Tensor,
    labels: torch.Tensor,
    fraction: float = 0.05,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random eviction baseline: remove ``round(fraction * n_c)`` points of every class, uniformly at random.

    Args:
        features: ``[n, d]`` features (only their number and device are used).
        labels: ``[n]`` integer labels.
        fraction: share of each class to remove, in [0, 1).
        generator: CPU ``torch.Generator`` for reproducible draws.

    Returns:
        BoolTensor ``[n]`` (``True`` = keep) on the features' device.

    Raises:
        ValueError: on mismatched lengths or a fraction outside [0, 1).
    """
    features, labels = check_features_labels(features, labels)
    check_fraction("fraction", fraction)
    y = labels.cpu()
    keep = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    for c in torch.unique(y).tolist():
        members = (y == c).nonzero().flatten()
        m = _per_class_count(members.numel(), fraction)
        if m:
            device = generator.device if generator is not None else y.device
            keep[members[torch.randperm(members.numel(), generator=generator, device=device)[:m]]] = False
    return keep.to(features.device)
