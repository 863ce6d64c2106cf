"""Callbacks usable on any LightningModule (they never import ``lightning_robust.models``)."""

from lightning_robust.callbacks.robustness_evaluation import RobustnessEvaluation

__all__ = ["RobustnessEvaluation"]
