"""Callbacks usable on any LightningModule (they never import ``lightning_robust.models``)."""

from lightning_robust.callbacks.gan_evaluation import GANEvaluation
from lightning_robust.callbacks.sample_grid import SampleGrid

__all__ = ["GANEvaluation", "SampleGrid"]
