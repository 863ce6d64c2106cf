"""torchmetrics metrics of robustness (synchronised across processes)."""

from lightning_robust.metrics.robust_accuracy import RobustAccuracy

__all__ = ["RobustAccuracy"]
