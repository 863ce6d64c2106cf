"""LightningModules."""

from lightning_robust.models.classifier import Classifier
from lightning_robust.models.interpretation import InterpretationRegularizedClassifier

__all__ = ["Classifier", "InterpretationRegularizedClassifier"]
