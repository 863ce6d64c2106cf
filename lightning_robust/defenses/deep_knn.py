"""Deep k-NN poison filter (Peri et al., "Deep k-NN Defense against Clean-label Data Poisoning Attacks",
arXiv 1909.13374): drop every training point whose label is not the plurality label of its k nearest
neighbours in feature space.

Clean-label poisons (feature collision, convex polytope) carry the label of their base class but are
optimised to sit on top of a target of another class in feature space, so their neighbours vote for the
target class and they are removed. The computation is a chunked brute-force k-NN: for a block of query rows
``||x_j||^2 - 2 q_i . x_j`` is one ``addmm`` (``||q_i||^2`` does not change the ranking of a row), the k
smallest entries per row come from ``topk``, and the labels of those neighbours are counted. Memory is one
``[chunk, n]`` block, so 50,000 points and more run on a laptop or a GPU.
"""

from __future__ import annotations

import torch

from lightning_robust.utils.validation import check_choice, check_positive, check_positive_int, check_same_length

__all__ = [
    "CLASS_BALANCES",
    "TIE_BREAKS",
    "deep_knn_filter",
    "default_k",
    "knn_vote_counts",
    "plurality_keep",
]

TIE_BREAKS = ("keep", "remove", "smallest")
CLASS_BALANCES = ("none", "replicate")
# Budget of one block of squared distances; 256 MB is 1,280 rows at n = 50,000 in float32.
_CHUNK_BYTES = 256 * 2**20


def check_features_labels(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(features [n, d] float, labels [n] long)`` or raise a ``ValueError`` naming the problem."""
    if not torch.is_tensor(features) or not features.is_floating_point():
        raise TypeError("features must be a floating-point tensor [n, d], got "
                        + (f"dtype {features.dtype}" if torch.is_tensor(features) else type(features).__name__))
    if not torch.is_tensor(labels) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError("labels must be an integer tensor [n] of class indices, got "
                        + (f"dtype {labels.dtype}" if torch.is_tensor(labels) else type(labels).__name__))
    if features.ndim < 2:
        raise ValueError(f"features must have shape [n, d] (one row per point), got shape {tuple(features.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional [n], got shape {tuple(labels.shape)}")
    check_same_length("features", features, "labels", labels)
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or inf")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be non-negative class indices, got minimum {int(labels.min())}")
    return features.flatten(1), labels.long()


def default_k(labels: torch.Tensor, normalized_k: float = 1.0) -> int:
    """The paper's guideline for k: a multiple of the number of examples per class.

    Peri et al. report k in terms of the *normalized k*, ``k / N`` with ``N`` the number of training
    examples per class, and find the filter works best for normalized k between 1 and 2 (k comparable to
    the class size: a poison sitting inside the target class's cluster is then outvoted by that whole
    cluster, while a clean point still sees mostly its own class). This returns
    ``round(normalized_k * N)`` with ``N`` the mean size of the classes present, clipped to ``[1, n - 1]``.

    Args:
        labels: class index of every point.
        normalized_k: ``k / N``; the paper's recommended range is [1, 2]; 1 is the default.

    Raises:
        ValueError: if there are fewer than two points or ``normalized_k`` is not positive.
    """
    check_positive("normalized_k", normalized_k)
    n = int(labels.numel())
    if n < 2:
        raise ValueError(f"the k-NN filter needs at least 2 points, got {n}")
    counts = torch.bincount(labels.long().flatten().cpu())
    per_class = float(counts[counts > 0].float().mean())
    return int(min(max(1, round(normalized_k * per_class)), n - 1))


def _class_weights(labels: torch.Tensor, balance: str, num_classes: int) -> torch.Tensor | None:
    """Integer vote weight of each class: ``floor(max_count / count_c)`` when replicating, else ``None``."""
    if balance == "none":
        return None
    counts = torch.bincount(labels, minlength=num_classes)
    weights = torch.zeros(num_classes, dtype=torch.long, device=labels.device)
    present = counts > 0
    weights[present] = torch.div(counts.max(), counts[present], rounding_mode="floor")
    return weights


def knn_vote_counts(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int,
    *,
    rows: tuple[int, int] | None = None,
    class_balance: str = "none",
    num_classes: int | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-class vote counts among the k nearest neighbours (Euclidean, self excluded) of each query point.

    Args:
        features: ``[n, d]`` feature vectors (flattened if more dimensions).
        labels: ``[n]`` class indices.
        k: neighbours per point, ``1 <= k <= n - 1``.
        rows: optional ``(start, stop)``: count only for points ``start:stop`` (every point remains a
            candidate neighbour); used to split the work across processes.
        class_balance: ``"none"``, or ``"replicate"``: each point counts as ``floor(max_count / count_c)``
            copies of itself (the paper's remedy for class imbalance: replicate under-represented classes
            before the k-NN), so the k nearest of the replicated multiset are counted.
        num_classes: number of count columns (default ``labels.max() + 1``).
        chunk_size: query rows per block (default: a 256 MB block of distances).
        device: where to compute (default: the features' device).

    Returns:
        LongTensor ``[stop - start, num_classes]`` on ``device``.

    Neighbour selection is deterministic: when several points share the k-th smallest distance, those
    with the lower index are taken first.
    """
    features, labels = check_features_labels(features, labels)
    n = features.shape[0]
    check_positive_int("k", k)
    if k > n - 1:
        raise ValueError(f"k must be at most n - 1 = {n - 1} (the number of other points; self is excluded), "
                         f"got {k}")
    check_choice("class_balance", class_balance, CLASS_BALANCES)
    start, stop = (0, n) if rows is None else (int(rows[0]), int(rows[1]))
    if not 0 <= start <= stop <= n:
        raise ValueError(f"rows must satisfy 0 <= start <= stop <= n = {n}, got {rows!r}")
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    dev = torch.device(device) if device is not None else features.device
    x = features.to(dev)
    y = labels.to(dev)
    c = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if n else 0)
    if n and int(y.max()) >= c:
        raise ValueError(f"num_classes={c} is too small for labels up to {int(y.max())}")
    weights = _class_weights(y, class_balance, c)
    sq = (x * x).sum(1)
    chunk = chunk_size or max(1, _CHUNK_BYTES // max(1, n * x.element_size()))
    out = torch.zeros(stop - start, c, dtype=torch.long, device=dev)
    ordered = weights is not None  # replication fills the k slots nearest-first: needs sorted order
    for lo in range(start, stop, chunk):
        hi = min(lo + chunk, stop)
        # ||q||^2 is constant along a row, so ||x||^2 - 2 q.x ranks neighbours exactly like ||q - x||^2.
        dist = torch.addmm(sq.unsqueeze(0), x[lo:hi], x.T, alpha=-2.0)
        own = torch.arange(lo, hi, device=dev)
        dist[own - lo, own] = float("inf")  # self is never its own neighbour
        # k + 1 candidates (k + 1 <= n always holds), to see whether the k-th distance is shared with the
        # (k + 1)-th: a boundary tie, where topk's choice among equal values is unspecified.
        vals, idx = dist.topk(k + 1, dim=1, largest=False, sorted=ordered)
        if ordered:
            kth, nxt = vals[:, k - 1], vals[:, k]
            idx = idx[:, :k]
        else:
            top2 = vals.topk(2, dim=1).values
            kth, nxt = top2[:, 1], top2[:, 0]
            far = vals.argmax(1, keepdim=True)
            keep = torch.ones_like(vals, dtype=torch.bool).scatter_(1, far, False)
            idx = idx[keep].view(idx.shape[0], k)
        tied = (nxt == kth).nonzero().flatten()
        if tied.numel():
            # Rare (duplicated points): redo those rows with a stable sort, so lower indices win the ties.
            idx[tied] = torch.sort(dist[tied], dim=1, stable=True).indices[:, :k]
        nb = y[idx]  # [rows, k] labels of the neighbours, nearest first when ordered
        if weights is None:
            out[lo - start: hi - start].scatter_add_(1, nb, torch.ones_like(nb))
        else:
            w = weights[nb]
            before = w.cumsum(1) - w
            take = (k - before).clamp(min=0).minimum(w)
            out[lo - start: hi - start].scatter_add_(1, nb, take)
    return out


def plurality_keep(counts: torch.Tensor, labels: torch.Tensor, tie_break: str = "keep") -> torch.Tensor:
    """Keep mask from neighbour vote counts ``[m, C]`` and the points' own labels ``[m]``.

    ``tie_break`` decides a point whose label ties with another label for the most votes:

    * ``"keep"`` (default): kept. A point is removed only when another label has strictly more votes; a
      poison is removed only when its neighbourhood clearly belongs to another class.
    * ``"remove"``: removed; a point is kept only when its label is the unique plurality.
    * ``"smallest"``: the smallest tied label wins (the behaviour of scikit-learn's
      ``KNeighborsClassifier.predict``, used by the authors' code).
    """
    check_choice("tie_break", tie_break, TIE_BREAKS)
    own = counts.gather(1, labels.long().view(-1, 1)).squeeze(1)
    best = counts.max(1).values
    if tie_break == "keep":
        return own == best
    if tie_break == "remove":
        return (own == best) & ((counts == best.unsqueeze(1)).sum(1) == 1)
    return counts.argmax(1) == labels.long()


def deep_knn_filter(
    features: torch.Tensor,
    labels: torch.Tensor,
    k: int | None = None,
    *,
    normalized_k: float = 1.0,
    tie_break: str = "keep",
    class_balance: str = "none",
    rows: tuple[int, int] | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Deep k-NN poison filter (Peri et al., arXiv 1909.13374): keep a point iff its label is the plurality
    label of its k nearest neighbours in feature space (Euclidean, the point itself excluded).

    ``keep_i = [ y_i in argmax_c #{ j in kNN(i) : y_j = c } ]``

    Args:
        features: ``[n, d]`` features (e.g. the penultimate layer of the victim network).
        labels: ``[n]`` integer class labels (as given in the training set: clean labels for poisons).
        k: number of neighbours, ``1 <= k <= n - 1``. ``None`` (default) follows the paper's guideline, k
            about the number of examples per class: ``default_k(labels, normalized_k)``.
        normalized_k: ``k / examples-per-class`` used when ``k`` is ``None`` (paper: best in [1, 2]).
        tie_break: ``"keep"`` (default), ``"remove"`` or ``"smallest"``; see :func:`plurality_keep`.
        class_balance: ``"none"`` or ``"replicate"`` (count each point ``floor(max_count / count_c)``
            times, the paper's remedy for class imbalance); see :func:`knn_vote_counts`.
        rows: compute the decision only for points ``start:stop`` (all points stay candidate neighbours).
        chunk_size: query rows per block; memory is about ``chunk_size * n`` distances.
        device: where to compute (default: the features' device).

    Returns:
        BoolTensor ``[n]`` (or ``[stop - start]``) on the features' device; ``True`` = keep.

    Raises:
        ValueError: features and labels of different lengths, ``k`` outside ``[1, n - 1]``, an unknown
            ``tie_break`` / ``class_balance``.

    Example:
        >>> keep = deep_knn_filter(features, labels)          # k = examples per class
        >>> keep = deep_knn_filter(features, labels, k=50)
        >>> clean_features, clean_labels = features[keep], labels[keep]
    """
    features, labels = check_features_labels(features, labels)
    check_choice("tie_break", tie_break, TIE_BREAKS)
    check_positive("normalized_k", normalized_k)
    if k is None:
        k = default_k(labels, normalized_k)
    counts = knn_vote_counts(features, labels, k, rows=rows, class_balance=class_balance, chunk_size=chunk_size,
                             device=device)
    start, stop = (0, features.shape[0]) if rows is None else rows
    keep = plurality_keep(counts, labels[start:stop].to(counts.device), tie_break)
    return keep.to(features.device)
