"""Deep k-NN poison filter (Peri et al., "Deep k-NN Defense against Clean-label Data Poisoning Attacks",
arXiv 1909.13374): drop every training point whose label is not the plurality label of its k nearest
neighbours in feature space.

Clean-label poisons (feature collision, convex polytope) carry the label of their base class but are
optimised to sit on top of a target of another class in feature space, so their neighbours vote for the
target class and they are removed. The computation is a chunked brute-force k-NN: for a block of query rows
``||x_j||^2 - 2 q_i . x_j`` is one ``addmm`` (``||q_i||^2`` does not change the ranking of a row), the k
smallest entries per row come from ``topk``, and the labels of those neighbours are counted. Memory is one
``[chunk, n]`` block, so 50,000 points and more run on a laptop or a GPU.

That expansion cancels catastrophically when the features have a large common offset relative to their
spread, or overflows in half precision, and the decision depends only on distance ranks. So the features
are first centred and scaled by a power of two (neither changes a rank), the block is computed in float32
(float64 for float64 features), and a rigorous bound on its rounding error separates the sure neighbours
and sure non-neighbours from the few points near the k-th distance, whose distances are recomputed exactly
in float64. The result equals that of a float64 brute force on the given values, at matmul rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

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
# On the CPU the block is read again by topk and the boundary checks right after the matmul writes it: a
# smaller block stays in cache (32 MB ran at 0.69 of the matmul rate against 0.65 for 256 MB at n = 8,000,
# BENCHMARKS.md deep_knn_block). With the block buffer reused (no fresh pages per block) 64 MB (268 rows at
# n = 50,000) ran the matmul + topk at 0.82 of the matmul rate against 0.72 for 32 MB. GPUs keep the large block.
_CPU_BLOCK_BYTES = 64 * 2**20


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
        labels: class index of every point (any non-negative ids; sparse ids cost no per-id memory).
        normalized_k: ``k / N``; the paper's recommended range is [1, 2]; 1 is the default.

    Raises:
        ValueError: if there are fewer than two points or ``normalized_k`` is not positive.
    """
    check_positive("normalized_k", normalized_k)
    n = int(labels.numel())
    if n < 2:
        raise ValueError(f"the k-NN filter needs at least 2 points, got {n}")
    counts = torch.unique(labels.long().flatten().cpu(), return_counts=True)[1]
    per_class = float(counts.double().mean())
    return int(min(max(1, round(normalized_k * per_class)), n - 1))


def _dense_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dense [n], ids [C])``: ``labels == ids[dense]`` with ``ids`` sorted, so an id of 2,000,000 costs one
    column, not two million, and the smallest dense id is still the smallest label."""
    ids, dense = torch.unique(labels, sorted=True, return_inverse=True)
    return dense, ids


def _class_weights(labels: torch.Tensor, balance: str, num_classes: int) -> torch.Tensor | None:
    """Integer vote weight of each (dense) class: ``floor(max_count / count_c)`` when replicating, else ``None``."""
    if balance == "none":
        return None
    counts = torch.bincount(labels, minlength=num_classes)
    weights = torch.zeros(num_classes, dtype=torch.long, device=labels.device)
    present = counts > 0
    weights[present] = torch.div(counts.max(), counts[present], rounding_mode="floor")
    return weights


def _unit_roundoff(work: torch.dtype, device: torch.device) -> float:
    """Unit roundoff of the distance matmul: that of ``work``, or bfloat16's (the coarsest a float32 matmul
    may use) when TF32 or reduced-precision float32 matmuls are enabled."""
    if work == torch.float32 and (torch.get_float32_matmul_precision() != "highest"
                                  or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)):
        return 2.0**-8
    return float(torch.finfo(work).eps) / 2


def _centred(x: torch.Tensor, work: torch.dtype, block: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(ct, sq, scale)``: ``ct = ((x - mean) * scale)^T`` in ``work``, stored ``[d, n]`` contiguous (the distance
    matmul's right operand; its query rows are column slices of it), ``sq = ||c||^2`` per row, ``scale`` a power
    of two bringing the largest entry of ``c`` into [1/2, 1].

    A common shift and a positive scale change no distance rank, but they decide the rounding error of
    ``||x||^2 - 2 q.x``: centring removes the offset the expansion would cancel, the power-of-two scale (exact
    in binary) keeps half-precision magnitudes from overflowing and underflowing.
    """
    n, d = x.shape
    # The mean's own rounding (float64, then to ``work``) is a common shift too: harmless. Subtracting it in
    # ``work`` errs by at most u |c| per entry, inside the bound of :func:`_neighbours`; the power-of-two
    # scale is exact. Two passes over the features in ``work``: no float64 copy of them.
    mean = (x.sum(0, dtype=torch.float64) / n).to(work)
    # Stored transposed: a [rows, d] x [d, n] product with a contiguous right operand ran ~15% faster on the
    # CPU than against the transposed view of a row-major copy (no extra memory: the rows are a view of it).
    ct = torch.empty(d, n, dtype=work, device=x.device)
    c = ct.T
    amax = 0.0
    for lo in range(0, n, block):
        torch.sub(x[lo:lo + block].to(work), mean, out=c[lo:lo + block])
        lo_v, hi_v = torch.aminmax(c[lo:lo + block])
        amax = max(amax, -float(lo_v), float(hi_v))
    scale = 2.0 ** -math.frexp(amax)[1] if amax > 0 else 1.0
    c.mul_(scale)
    sq = torch.empty(n, dtype=work, device=x.device)
    for lo in range(0, n, block):
        cb = c[lo:lo + block]
        sq[lo:lo + block] = (cb * cb).sum(1, dtype=torch.float64)  # products err by u each, the sum by ~0
    return ct, sq, scale


def _exact_sq_dist(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scale: float) -> torch.Tensor:
    """``||x_r - x_c||^2`` in float64 (times ``scale^2``, exactly, for float64 features) for the pairs
    ``(rows[p], cols[p])``, by differences of the given values (no cancellation), in bounded blocks."""
    d = x.shape[1]
    out = torch.empty(rows.shape[0], dtype=torch.float64, device=x.device)
    step = max(1, _CHUNK_BYTES // (16 * d))
    for lo in range(0, rows.shape[0], step):
        diff = torch.index_select(x, 0, cols[lo:lo + step]).double()
        diff.sub_(torch.index_select(x, 0, rows[lo:lo + step]))
        if x.dtype == torch.float64:
            diff.mul_(scale)  # a power of two: exact; keeps squares of huge float64 features finite
        out[lo:lo + step] = (diff * diff).sum(1)
    return out


def _neighbours(x: torch.Tensor, k: int, start: int, stop: int, chunk_size: int | None,
                ordered: bool) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(lo, hi, idx)``: ``idx [hi - lo, k]`` the exact k nearest neighbours (squared Euclidean
    distance of the float64 values, self excluded, lower index first among equal distances) of rows
    ``lo:hi``; nearest first when ``ordered``.

    Fast pass: the ``[chunk, n]`` block ``||c_j||^2 - 2 c_i . c_j`` of the centred, scaled features ``c`` is
    one ``addmm`` in float32 (float64 for float64 input). Its error is at most
    ``E_ij = b (||c_i||^2 + ||c_j||^2) + a`` with ``b = (d + 32) u``: the dot-product bound
    ``2 gamma_d |c_i||c_j| <= d u (||c_i||^2 + ||c_j||^2)`` (to first order), plus a few ``u`` for the
    centring, the norms, the addition and the bound's own arithmetic; ``a`` is the underflow allowance.
    From the k smallest lower bounds we get bounds ``[lowK_i, upK_i]`` on the true k-th distance: a point
    whose upper bound is below ``lowK_i`` is surely a neighbour, one whose lower bound is above ``upK_i``
    surely is not, and only the few in between get their distance recomputed exactly in float64 (about two
    per row on Gaussian clusters in 512-d). The matmul stays the dominant cost.
    """
    n, d = x.shape
    dev = x.device
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    itemsize = torch.empty((), dtype=work).element_size()
    budget = _CPU_BLOCK_BYTES if dev.type == "cpu" else _CHUNK_BYTES
    chunk = chunk_size or max(1, budget // max(1, n * (itemsize + 1)))
    ct, sq, scale = _centred(x, work, max(1, _CHUNK_BYTES // max(1, 8 * d)))
    b = (d + 32) * _unit_roundoff(work, dev)
    a = 4.0 * (d + 2) * float(torch.finfo(work).tiny)
    bsq = b * sq
    bias = (sq - bsq).unsqueeze(0)
    k_more = min(n - 1, k + max(16, k // 8))
    # One block buffer for all blocks: on the CPU a fresh [chunk, n] allocation per block is fresh pages,
    # whose first-touch faults cost ~10% of the matmul (side by side at n = 50,000).
    buf = torch.empty(min(chunk, max(1, stop - start)), n, dtype=work, device=dev)
    for lo in range(start, stop, chunk):
        hi = min(lo + chunk, stop)
        # Lp_ij = ||c_j||^2 - 2 c_i.c_j - b ||c_j||^2; the row constant ||c_i||^2 changes no rank.
        dist = torch.addmm(bias, ct[:, lo:hi].T, ct, alpha=-2.0, out=buf[: hi - lo])
        own = torch.arange(lo, hi, device=dev)
        dist[own - lo, own] = float("inf")  # self is never its own neighbour
        ri = (bsq[lo:hi] + a).unsqueeze(1)  # the row's share of E_ij
        # A few more than k: usually every candidate is among them, and one topk is all it takes.
        vals, idx = dist.topk(k_more, dim=1, largest=False, sorted=False)
        kth = vals.kthvalue(k, dim=1, keepdim=True).values
        low_k = kth - ri  # k-th smallest lower bound <= true k-th
        # max upper bound over (at least) k points >= true k-th
        up_k = torch.where(vals <= kth, vals + 2 * bsq[idx], -math.inf).max(1, keepdim=True).values + ri
        if k_more < n - 1 and bool((vals.max(1, keepdim=True).values <= up_k + ri).any()):
            # Some row has more candidates than fetched (near-duplicate distances): fetch them all.
            m = int((dist <= up_k + ri).sum(1).max())
            vals, idx = dist.topk(m, dim=1, largest=False, sorted=False)
        candidate = vals <= up_k + ri  # the other fetched entries are sure non-neighbours
        sure = (vals + 2 * bsq[idx] + ri < low_k) if not ordered else torch.zeros_like(candidate)
        need = candidate & ~sure
        r, col = need.nonzero(as_tuple=True)
        exact = _exact_sq_dist(x, r + lo, idx[r, col], scale)
        if ordered:
            # Replication fills the k slots nearest first: every candidate is exact; sort them all by
            # (distance, index): by index first, then a stable sort by distance.
            key = torch.full(idx.shape, math.inf, dtype=torch.float64, device=dev)
            key[r, col] = exact
            idx, perm = idx.sort(1)
            yield lo, hi, idx.gather(1, key.gather(1, perm).sort(dim=1, stable=True).indices[:, :k])
            continue
        # Unordered: the sure neighbours, plus per row the k - #sure best boundary points by (distance,
        # index), found by one lexicographic sort of the few boundary pairs (index, then distance, then row).
        j = idx[r, col]
        o = torch.sort(j, stable=True).indices
        o = o[torch.sort(exact[o], stable=True).indices]
        o = o[torch.sort(r[o], stable=True).indices]
        rs, cs = r[o], col[o]
        per_row = torch.bincount(rs, minlength=hi - lo)
        rank = torch.arange(rs.numel(), device=dev) - (per_row.cumsum(0) - per_row)[rs]
        chosen = rank < (k - sure.sum(1))[rs]
        sure[rs[chosen], cs[chosen]] = True
        yield lo, hi, idx[sure].view(hi - lo, k)


def _vote_counts(x: torch.Tensor, y: torch.Tensor, num_classes: int, k: int, start: int, stop: int,
                 weights: torch.Tensor | None, chunk_size: int | None) -> torch.Tensor:
    """Vote counts ``[stop - start, num_classes]`` for dense labels ``y``; see :func:`knn_vote_counts`."""
    out = torch.zeros(stop - start, num_classes, dtype=torch.long, device=x.device)
    for lo, hi, idx in _neighbours(x, k, start, stop, chunk_size, ordered=weights is not None):
        nb = y[idx]  # [rows, k] labels of the neighbours, nearest first when weighted
        if weights is None:
            out[lo - start: hi - start].scatter_add_(1, nb, torch.ones_like(nb))
        else:
            w = weights[nb]
            before = w.cumsum(1) - w
            take = (k - before).clamp(min=0).minimum(w)
            out[lo - start: hi - start].scatter_add_(1, nb, take)
    return out


def _prepare(features: torch.Tensor, labels: torch.Tensor, k: int, rows: tuple[int, int] | None,
             class_balance: str, chunk_size: int | None,
             device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """Checked ``(x on device, dense labels, label ids, start, stop)``."""
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
    dense, ids = _dense_labels(labels.to(dev))
    return features.to(dev), dense, ids, start, stop


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
        features: ``[n, d]`` feature vectors (flattened if more dimensions), any floating dtype.
        labels: ``[n]`` class indices.
        k: neighbours per point, ``1 <= k <= n - 1``.
        rows: optional ``(start, stop)``: count only for points ``start:stop`` (every point remains a
            candidate neighbour); used to split the work across processes.
        class_balance: ``"none"``, or ``"replicate"``: each point counts as ``floor(max_count / count_c)``
            copies of itself (the paper's remedy for class imbalance: replicate under-represented classes
            before the k-NN), so the k nearest of the replicated multiset are counted.
        num_classes: number of count columns (default ``labels.max() + 1``).
        chunk_size: query rows per block (default: a 64 MB block of distances on the CPU, 256 MB on a GPU).
        device: where to compute (default: the features' device).

    Returns:
        LongTensor ``[stop - start, num_classes]`` on ``device``.

    The neighbours are exact: they are those of the squared distances computed in float64 from the given
    values, whatever the dtype, offset or scale of the features (see :func:`deep_knn_filter`). When several
    points share the k-th smallest distance, those with the lower index are taken first.
    """
    x, dense, ids, start, stop = _prepare(features, labels, k, rows, class_balance, chunk_size, device)
    c = int(num_classes) if num_classes is not None else int(ids.max()) + 1
    if int(ids.max()) >= c:
        raise ValueError(f"num_classes={c} is too small for labels up to {int(ids.max())}")
    counts = _vote_counts(x, dense, ids.numel(), k, start, stop,
                          _class_weights(dense, class_balance, ids.numel()), chunk_size)
    out = counts.new_zeros(counts.shape[0], c)
    out[:, ids] = counts
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
    x, dense, ids, start, stop = _prepare(features, labels, k, rows, class_balance, chunk_size, device)
    # Dense ids keep the counts [rows, classes present]; their order is that of the labels, so "smallest"
    # still picks the smallest label.
    counts = _vote_counts(x, dense, ids.numel(), k, start, stop, _class_weights(dense, class_balance, ids.numel()),
                          chunk_size)
    keep = plurality_keep(counts, dense[start:stop], tie_break)
    return keep.to(features.device)
