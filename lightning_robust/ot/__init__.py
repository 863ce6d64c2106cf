"""Optimal transport in pure PyTorch: Normalized Wasserstein (arXiv 1902.00415) and its applications."""

from lightning_robust.ot.mixtures import assign_to_generators, clustering_accuracy, kmeans, mixture_recovery_errors
from lightning_robust.ot.normalized_wasserstein import (
    MixtureProportions,
    NWEstimate,
    NWSinkhornResult,
    class_mixture_weights,
    estimate_normalized_wasserstein,
    mixture_expectation,
    normalized_wasserstein,
    normalized_wasserstein_sinkhorn,
    sample_mixture,
)
from lightning_robust.ot.two_sample import TwoSampleTestResult, nw_two_sample_test

__all__ = [
    "MixtureProportions",
    "NWEstimate",
    "NWSinkhornResult",
    "TwoSampleTestResult",
    "assign_to_generators",
    "class_mixture_weights",
    "clustering_accuracy",
    "estimate_normalized_wasserstein",
    "kmeans",
    "mixture_expectation",
    "mixture_recovery_errors",
    "normalized_wasserstein",
    "normalized_wasserstein_sinkhorn",
    "nw_two_sample_test",
    "sample_mixture",
]
