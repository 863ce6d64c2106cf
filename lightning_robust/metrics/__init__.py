"""torchmetrics ``Metric`` subclasses (synchronised across processes) for robustness evaluation."""

from lightning_robust.metrics.certified_accuracy import CertifiedAccuracy, certified_accuracy

__all__ = ["CertifiedAccuracy", "certified_accuracy"]
