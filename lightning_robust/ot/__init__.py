"""Optimal transport in pure PyTorch: log-domain Sinkhorn, Sinkhorn divergence, entropic-GAN likelihoods."""

from lightning_robust.ot.costs import COSTS, cost_log_normalizer, pairwise_cost
from lightning_robust.ot.entropic_dual import (
    entropic_coupling,
    entropic_dual_objective,
    primal_transport_cost,
    scheduled_reg,
)
from lightning_robust.ot.likelihood import LikelihoodResult, SoftCTransform, entropic_log_likelihood, fit_fake_potential
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
from lightning_robust.ot.sinkhorn import SinkhornConvergenceWarning, SinkhornResult, sinkhorn, sinkhorn_divergence
from lightning_robust.ot.two_sample import TwoSampleTestResult, nw_two_sample_test

__all__ = [
    "COSTS",
    "LikelihoodResult",
    "MixtureProportions",
    "NWEstimate",
    "NWSinkhornResult",
    "SinkhornConvergenceWarning",
    "SinkhornResult",
    "SoftCTransform",
    "TwoSampleTestResult",
    "assign_to_generators",
    "class_mixture_weights",
    "clustering_accuracy",
    "cost_log_normalizer",
    "entropic_coupling",
    "entropic_dual_objective",
    "entropic_log_likelihood",
    "estimate_normalized_wasserstein",
    "fit_fake_potential",
    "kmeans",
    "mixture_expectation",
    "mixture_recovery_errors",
    "normalized_wasserstein",
    "normalized_wasserstein_sinkhorn",
    "nw_two_sample_test",
    "pairwise_cost",
    "primal_transport_cost",
    "sample_mixture",
    "scheduled_reg",
    "sinkhorn",
    "sinkhorn_divergence",
]
