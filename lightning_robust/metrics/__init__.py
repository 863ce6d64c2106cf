"""torchmetrics metrics built on the pure packages."""

from lightning_robust.metrics.topk_intersection import TopKIntersection

__all__ = ["TopKIntersection"]
