"""Deep k-NN filter against brute-force references (full distance matrix, scikit-learn), ties, errors."""

import numpy as np
import pytest
import torch

from lightning_robust.defenses import deep_knn_filter, default_k, knn_vote_counts, plurality_keep


def _brute_counts(x: torch.Tensor, y: torch.Tensor, k: int, copies: torch.Tensor | None = None) -> torch.Tensor:
    """Vote counts from the full distance matrix; neighbours ordered by (distance, index), self excluded.

    With ``copies`` (copies per point), the k nearest of the replicated multiset are counted, copies of
    the query point excluded.
    """
    n = x.shape[0]
    c = int(y.max()) + 1
    d = torch.cdist(x.double(), x.double())
    out = torch.zeros(n, c, dtype=torch.long)
    for i in range(n):
        row = d[i].clone()
        row[i] = float("inf")
        order = torch.sort(row, stable=True).indices[: n - 1]
        nb = order[:k] if copies is None else order.repeat_interleave(copies[order])[:k]
        out[i] = torch.bincount(y[nb], minlength=c)
    return out


def _brute_keep(counts: torch.Tensor, y: torch.Tensor, tie_break: str) -> torch.Tensor:
    keep = []
    for row, label in zip(counts.tolist(), y.tolist()):
        best = max(row)
        winners = [c for c, v in enumerate(row) if v == best]
        if tie_break == "keep":
            keep.append(label in winners)
        elif tie_break == "remove":
            keep.append(winners == [label])
        else:
            keep.append(min(winners) == label)
    return torch.tensor(keep)


@pytest.mark.parametrize("k", [1, 4, 15])
@pytest.mark.parametrize("tie_break", ["keep", "remove", "smallest"])
def test_matches_brute_force_on_random_data(k, tie_break):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(90, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (90,), generator=g)
    ref_counts = _brute_counts(x, y, k)
    counts = knn_vote_counts(x, y, k, chunk_size=16)
    assert torch.equal(counts, ref_counts)
    keep = deep_knn_filter(x, y, k, tie_break=tie_break, chunk_size=32)
    assert keep.dtype == torch.bool and torch.equal(keep, _brute_keep(ref_counts, y, tie_break))


def test_matches_scikit_learn_knn_classifier():
    # scikit-learn's predict(None) predicts every fitted point from its neighbours without itself, and
    # breaks vote ties toward the smallest label: the authors' rule, tie_break="smallest".
    from sklearn.neighbors import KNeighborsClassifier

    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (300,), generator=g)
    for k in (1, 6, 20):
        pred = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(x.numpy(), y.numpy()).predict(None)
        keep = deep_knn_filter(x, y, k, tie_break="smallest")
        assert torch.equal(keep, torch.as_tensor(pred == y.numpy()))


def test_chunking_rows_and_dtype_do_not_change_the_result():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 16, generator=g)
    y = torch.randint(0, 3, (200,), generator=g)
    full = deep_knn_filter(x, y, 9)
    for chunk in (1, 7, 64, 1000):
        assert torch.equal(deep_knn_filter(x, y, 9, chunk_size=chunk), full)
    pieces = [deep_knn_filter(x, y, 9, rows=(lo, min(lo + 70, 200))) for lo in range(0, 200, 70)]
    assert torch.equal(torch.cat(pieces), full)
    assert torch.equal(deep_knn_filter(x.double(), y, 9), full)


def test_distance_ties_prefer_lower_indices():
    # Integer points on a small grid: many exactly equal distances. Neighbours at the k-th distance are
    # taken in index order, whatever topk would return.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 3, (120, 2), generator=g).double()
    y = torch.randint(0, 3, (120,), generator=g)
    for k in (1, 5, 12):
        ref = _brute_counts(x, y, k)
        assert torch.equal(knn_vote_counts(x, y, k, chunk_size=50), ref)
        assert torch.equal(knn_vote_counts(x.float(), y, k), ref)
        assert torch.equal(knn_vote_counts(x, y, k, class_balance="replicate"), _brute_counts(
            x, y, k, copies=_copies(y)))


def _copies(y: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(y)
    return (counts.max() // counts)[y]


def test_replicate_matches_an_explicitly_replicated_set():
    # Class 2 has 10 points, class 0 has 60: each class-2 point counts as 6 copies, class 1 (30) as 2.
    g = torch.Generator().manual_seed(5)
    y = torch.cat([torch.zeros(60), torch.ones(30), torch.full((10,), 2.0)]).long()
    x = torch.randn(100, 4, generator=g, dtype=torch.float64) + y[:, None].double()
    for k in (3, 10, 40):
        ref = _brute_counts(x, y, k, copies=_copies(y))
        assert torch.equal(knn_vote_counts(x, y, k, class_balance="replicate", chunk_size=33), ref)
        assert int(ref.sum(1).unique().item()) == k


def test_planted_feature_collisions_are_removed():
    # Two tight clusters; five class-0 points moved into the class-1 cluster keep label 0 (like clean-label
    # poisons sitting on a target) and must be dropped; no clean point is.
    g = torch.Generator().manual_seed(0)
    y = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    x = torch.randn(100, 8, generator=g) * 0.3
    x[y == 1] += 4.0
    poisons = torch.arange(5)
    x[poisons] = 4.0 + 0.3 * torch.randn(5, 8, generator=g)
    keep = deep_knn_filter(x, y)  # default k = 50 = examples per class
    assert not keep[poisons].any()
    assert keep[5:].all()


def test_default_k_follows_examples_per_class():
    y = torch.arange(10).repeat_interleave(50)
    assert default_k(y) == 50
    assert default_k(y, normalized_k=2.0) == 100
    assert default_k(torch.tensor([0, 0, 1])) == 2  # clipped to n - 1
    with pytest.raises(ValueError, match="normalized_k must be a positive number"):
        default_k(y, normalized_k=0)


def test_plurality_rules_on_explicit_counts():
    counts = torch.tensor([[3, 3, 0], [1, 4, 0], [0, 2, 2], [5, 0, 0]])
    labels = torch.tensor([1, 1, 2, 0])
    assert plurality_keep(counts, labels, "keep").tolist() == [True, True, True, True]
    assert plurality_keep(counts, labels, "remove").tolist() == [False, True, False, True]
    assert plurality_keep(counts, labels, "smallest").tolist() == [False, True, False, True]
    assert plurality_keep(counts, torch.tensor([0, 0, 1, 1]), "smallest").tolist() == [True, False, True, False]


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, y: deep_knn_filter(x, y[:-1], 3), "features and labels must have the same length, got 20 and 19"),
        (lambda x, y: deep_knn_filter(x, y, 20), r"k must be at most n - 1 = 19 .*got 20"),
        (lambda x, y: deep_knn_filter(x, y, 0), "k must be a positive integer, got 0"),
        (lambda x, y: deep_knn_filter(x, y, 3, tie_break="vote"), "tie_break must be one of"),
        (lambda x, y: deep_knn_filter(x, y, 3, class_balance="smote"), "class_balance must be one of"),
        (lambda x, y: deep_knn_filter(x[:, 0], y, 3), r"features must have shape \[n, d\]"),
        (lambda x, y: deep_knn_filter(x, y - 5, 3), "labels must be non-negative"),
        (lambda x, y: deep_knn_filter(x * float("nan"), y, 3), "features contain NaN or inf"),
        (lambda x, y: deep_knn_filter(x, y, 3, rows=(5, 30)), "rows must satisfy"),
    ],
)
def test_bad_input_gives_one_clear_error(call, match):
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    with pytest.raises(ValueError, match=match):
        call(x, y)


def test_float_labels_are_rejected():
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        deep_knn_filter(torch.randn(5, 2), torch.zeros(5), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_cpu():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3000, 64, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (3000,), generator=g)
    cpu = deep_knn_filter(x, y, chunk_size=500)
    gpu = deep_knn_filter(x.cuda(), y.cuda(), chunk_size=500)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    assert torch.equal(deep_knn_filter(x, y, device="cuda"), cpu)


def test_numpy_reference_agrees_on_class_imbalanced_data():
    # An independent numpy reference of the default filter on imbalanced classes.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 5))
    y = rng.choice(3, size=150, p=[0.6, 0.3, 0.1])
    k = default_k(torch.as_tensor(y))
    assert k == round(150 / 3)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nb = np.argsort(d, axis=1, kind="stable")[:, :k]
    counts = np.stack([np.bincount(y[row], minlength=3) for row in nb])
    ref = counts[np.arange(150), y] == counts.max(1)
    assert np.array_equal(deep_knn_filter(torch.as_tensor(x), torch.as_tensor(y)).numpy(), ref)


def _exact_keep(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Float64 brute force by differences (no ``|a|^2 - 2ab + |b|^2`` expansion), (distance, index) order."""
    x = x.double()
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    d.fill_diagonal_(float("inf"))
    nb = torch.sort(d, dim=1, stable=True).indices[:, :k]
    counts = torch.stack([torch.bincount(y[row], minlength=int(y.max()) + 1) for row in nb])
    return counts.gather(1, y[:, None]).squeeze(1) == counts.max(1).values


def _grid_clusters(seed: int, n: int = 200, d: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Three overlapping clusters with coordinates on the 2^-10 grid in [0, 1): exactly representable in
    float16 and, after adding 1000 or scaling by a power of two, in float32, so those copies have exactly the
    geometry of the original."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    centres = torch.rand(3, d, generator=g, dtype=torch.float64) * 0.3 + 0.35
    x = (centres[y] + 0.12 * torch.randn(n, d, generator=g, dtype=torch.float64)).clamp(0, 1023 / 1024)
    return torch.round(x * 1024) / 1024, y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shifted_scaled_and_half_copies_match_an_exact_float64_reference(seed):
    # Issue 18: ||x||^2 - 2 x.q in the input dtype cancelled (float32 + 1000 removed other points than the
    # exact filter) and overflowed in float16 (features x 64 give squared norms above 65504).
    x, y = _grid_clusters(seed)
    k = 15
    ref = _exact_keep(x, y, k)
    exact_copies = {
        "float32 + 1000": x.float() + 1000, "float32 + 16000": x.float() + 16000,
        "float32 x 2^20": x.float() * 2**20, "float32 x 2^-20": x.float() * 2**-20,
        "float16": x.half(), "float16 x 64": x.half() * 64, "float16 x 2^-8": x.half() * 2**-8,
        "bfloat16 x 2^30": (x * 4).floor().bfloat16() * 2**30,
        "float64 + 1e9": x + 1e9,
    }
    for name, copy in exact_copies.items():
        want = ref if name != "bfloat16 x 2^30" else _exact_keep(copy, y, k)
        assert torch.equal(deep_knn_filter(copy, y, k), want), name
    # Copies whose rounding changes the geometry: equal to the float64 reference of the copy's own values.
    g = torch.Generator().manual_seed(10 + seed)
    z = torch.randn(200, 16, generator=g, dtype=torch.float64)
    for name, copy in {"float32 x 100 + 1000": (z * 100 + 1000).float(), "float16 x 100": (z * 100).half(),
                       "float16 + 40": (z + 40).half(), "float64 + 1e12": z + 1e12}.items():
        want = _exact_keep(copy, y, k)
        assert torch.equal(deep_knn_filter(copy, y, k), want), name
        assert torch.equal(deep_knn_filter(copy, y, k, chunk_size=7), want), name
        for balance in ("none", "replicate"):
            assert torch.equal(knn_vote_counts(copy, y, k, class_balance=balance),
                               knn_vote_counts(copy.double(), y, k, class_balance=balance)), name


def test_issue_example_offset_1000_in_float32():
    # The report's case: 200 Gaussian points, an offset of 1000 (float32); the exact filter removes the same
    # points with or without the offset (up to the float32 rounding of the shifted values).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = torch.randint(0, 2, (200,), generator=g)
    shifted = x + 1000
    assert torch.equal(deep_knn_filter(shifted, y, 20), _exact_keep(shifted, y, 20))
    assert torch.equal(deep_knn_filter(x, y, 20), _exact_keep(x, y, 20))


def test_sparse_label_ids_cost_no_per_id_memory():
    # Labels 0, 2,000,000 and 2**41: counts over dense ids, the same decisions as labels 0, 1, 2 (ids keep
    # their order, so tie_break="smallest" picks the same label). A per-id count row of 2**41 columns could
    # not even be allocated.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(60, 3, generator=g)
    y = torch.randint(0, 3, (60,), generator=g)
    sparse = torch.tensor([0, 2_000_000, 2**41])[y]
    assert default_k(sparse) == default_k(y)
    for tie_break in ("keep", "remove", "smallest"):
        for balance in ("none", "replicate"):
            assert torch.equal(deep_knn_filter(x, sparse, 9, tie_break=tie_break, class_balance=balance),
                               deep_knn_filter(x, y, 9, tie_break=tie_break, class_balance=balance))
    counts = knn_vote_counts(x, torch.tensor([0, 5, 9])[y], 9)
    assert counts.shape == (60, 10) and torch.equal(counts[:, [0, 5, 9]], knn_vote_counts(x, y, 9))
