"""torchmetrics-based metrics."""

from lightning_robust.metrics.image_quality import ClassifierFeatures, PrecomputedFeatures, image_quality

__all__ = ["ClassifierFeatures", "PrecomputedFeatures", "image_quality"]
