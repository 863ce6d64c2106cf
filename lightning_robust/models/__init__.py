"""LightningModules."""

from lightning_robust.models.classifier import Classifier

__all__ = ["Classifier"]
