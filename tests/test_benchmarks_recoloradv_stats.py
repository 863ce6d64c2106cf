"""The paired statistics of benchmarks/bench_recoloradv.py against scipy and by hand."""

import itertools

import pytest

from benchmarks.bench_recoloradv import holm, mcnemar_exact

scipy_stats = pytest.importorskip("scipy.stats")


def test_exact_mcnemar_is_the_two_sided_binomial_test_on_discordant_pairs():
    for b, c in itertools.product(range(0, 25, 3), range(0, 25, 4)):
        expected = 1.0 if b + c == 0 else scipy_stats.binomtest(b, b + c, 0.5).pvalue
        assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-15)
        assert mcnemar_exact(b, c) == mcnemar_exact(c, b)


def test_holm_step_down():
    # m = 4: sorted p (0.01, 0.03, 0.04, 0.5) -> (4 x 0.01, max(., 3 x 0.03), max(., 2 x 0.04), max(., 0.5)).
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([0.2, 0.6]) == pytest.approx([0.4, 0.6])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])
