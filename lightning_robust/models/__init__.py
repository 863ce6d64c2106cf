"""LightningModules."""

from lightning_robust.models.ard import ARDStudent
from lightning_robust.models.classifier import Classifier

__all__ = ["ARDStudent", "Classifier"]
