"""Callbacks usable on any LightningModule (they never import ``lightning_robust.models``)."""

from lightning_robust.callbacks.poison_filter import FILTER_METHODS, DeepKNNPoisonFilter

__all__ = ["FILTER_METHODS", "DeepKNNPoisonFilter"]
