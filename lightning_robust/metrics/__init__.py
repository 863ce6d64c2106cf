"""torchmetrics ``Metric`` subclasses and their functional forms."""

from lightning_robust.metrics.poison_detection import PoisonDetection, poison_detection_scores

__all__ = ["PoisonDetection", "poison_detection_scores"]
