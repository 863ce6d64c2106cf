"""LightningModules."""

from lightning_robust.models.classifier import Classifier
from lightning_robust.models.gan import GAN

__all__ = ["Classifier", "GAN"]
