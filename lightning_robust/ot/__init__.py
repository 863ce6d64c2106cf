"""Optimal transport in pure PyTorch: log-domain Sinkhorn, Sinkhorn divergence, entropic-GAN likelihoods."""

from lightning_robust.ot.costs import COSTS, cost_log_normalizer, pairwise_cost
from lightning_robust.ot.entropic_dual import (
    entropic_coupling,
    entropic_dual_objective,
    primal_transport_cost,
    scheduled_reg,
)
from lightning_robust.ot.likelihood import (
    LikelihoodResult,
    SoftCTransform,
    entropic_log_likelihood,
    fit_fake_potential,
)
from lightning_robust.ot.sinkhorn import SinkhornConvergenceWarning, SinkhornResult, sinkhorn, sinkhorn_divergence

__all__ = [
    "COSTS",
    "LikelihoodResult",
    "SinkhornConvergenceWarning",
    "SinkhornResult",
    "SoftCTransform",
    "cost_log_normalizer",
    "entropic_coupling",
    "entropic_dual_objective",
    "entropic_log_likelihood",
    "fit_fake_potential",
    "pairwise_cost",
    "primal_transport_cost",
    "scheduled_reg",
    "sinkhorn",
    "sinkhorn_divergence",
]
