"""torchmetrics-based metrics."""

from lightning_robust.metrics.image_quality import ClassifierFeatures, image_quality

__all__ = ["ClassifierFeatures", "image_quality"]
