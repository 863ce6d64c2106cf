"""Clean cross-entropy: the standard supervised objective."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from lightning_robust.objectives.base import Objective, ObjectiveOutput, TrainingBatch
from lightning_robust.utils.validation import check_fraction, check_non_negative

__all__ = ["CrossEntropy"]


class CrossEntropy(Objective):
    """``weight · CE(f(inputs), y)`` with optional label smoothing, on the current training inputs.

    The inputs are the clean ones unless an earlier objective in the list replaced them.

    Args:
        weight: factor of the term (>= 0).
        label_smoothing: cross-entropy label smoothing in [0, 1).

    Example:
        >>> Classifier(SmallCNN(input_size=8), objectives=[CrossEntropy(label_smoothing=0.1)])
    """

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        self.weight = float(check_non_negative("weight", weight))
        self.label_smoothing = float(check_fraction("label_smoothing", label_smoothing))

    def __call__(self, module: nn.Module, batch: TrainingBatch) -> ObjectiveOutput:
        loss = F.cross_entropy(batch.input_logits(module), batch.y, label_smoothing=self.label_smoothing)
        return (loss if self.weight == 1 else self.weight * loss), {}
