"""The paper's baseline filters: L2 outlier, one-class SVM, random eviction."""

import numpy as np
import pytest
import torch

from lightning_robust.defenses import l2_outlier_filter, one_class_svm_filter, random_eviction


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (120,), generator=g)
    x = torch.randn(120, 6, generator=g) + 3 * y[:, None].float()
    return x, y


def test_l2_outlier_matches_numpy_per_class_reference():
    x, y = _data()
    keep = l2_outlier_filter(x, y, fraction=0.1)
    xn, yn = x.double().numpy(), y.numpy()
    ref = np.ones(len(yn), dtype=bool)
    for c in np.unique(yn):
        idx = np.flatnonzero(yn == c)
        dist = np.linalg.norm(xn[idx] - xn[idx].mean(0), axis=1)
        ref[idx[np.argsort(-dist, kind="stable")[: round(0.1 * len(idx))]]] = False
    assert np.array_equal(keep.numpy(), ref)
    counts = torch.bincount(y)
    assert int((~keep).sum()) == sum(round(0.1 * int(n)) for n in counts)
    assert l2_outlier_filter(x, y, fraction=0.0).all()


def test_l2_outlier_removes_a_planted_far_point():
    x, y = _data(1)
    x[7] += 50.0
    assert not l2_outlier_filter(x, y, fraction=0.02)[7]


def test_one_class_svm_matches_scikit_learn_per_class():
    from sklearn.svm import OneClassSVM

    x, y = _data(2)
    keep = one_class_svm_filter(x, y, nu=0.1)
    for c in range(3):
        idx = (y == c).nonzero().flatten().numpy()
        ref = OneClassSVM(nu=0.1, gamma="scale").fit(x.double().numpy()[idx]).predict(x.double().numpy()[idx]) == 1
        assert np.array_equal(keep.numpy()[idx], ref)
    assert keep.any() and not keep.all()


def test_one_class_svm_flags_a_planted_outlier():
    x, y = _data(3)
    x[11] += 40.0
    assert not one_class_svm_filter(x, y, nu=0.05)[11]


def test_random_eviction_counts_and_reproducibility():
    x, y = _data(4)
    a = random_eviction(x, y, 0.2, generator=torch.Generator().manual_seed(0))
    b = random_eviction(x, y, 0.2, generator=torch.Generator().manual_seed(0))
    c = random_eviction(x, y, 0.2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for cls in range(3):
        n_c = int((y == cls).sum())
        assert int((~a[y == cls]).sum()) == round(0.2 * n_c)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x, y: l2_outlier_filter(x, y, fraction=1.0), r"fraction must lie in \[0, 1\)"),
        (lambda x, y: random_eviction(x, y, fraction=-0.1), r"fraction must lie in \[0, 1\)"),
        (lambda x, y: one_class_svm_filter(x, y, nu=0.0), r"nu must lie in \(0, 1\]"),
        (lambda x, y: one_class_svm_filter(x, y, kernel="cubic"), "kernel must be one of"),
        (lambda x, y: one_class_svm_filter(x, y, gamma="big"), "gamma must be one of"),
        (lambda x, y: l2_outlier_filter(x, y[:5]), "features and labels must have the same length"),
    ],
)
def test_bad_arguments(call, match):
    x, y = _data()
    with pytest.raises(ValueError, match=match):
        call(x, y)
