"""How well a poison filter separates poisons from clean samples (the scores of Peri et al., arXiv 1909.13374).

Positive = poisoned, predicted positive = removed by the filter. From the confusion counts
``TP`` (poisons removed), ``FN`` (poisons kept), ``FP`` (clean samples removed), ``TN`` (clean kept):

* detection rate = recall = ``TP / (TP + FN)``;
* precision = ``TP / (TP + FP)``; F1 = ``2 P R / (P + R)``;
* MCC = ``(TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN))``;
* clean removed = ``FP`` and its share ``FP / (FP + TN)`` (false-positive rate).

All of them come from torchmetrics' binary classification metrics (``zero_division=0``: a ratio whose
denominator is zero is 0, as scikit-learn's default). MCC follows the same rule: where a margin of the
confusion matrix is empty (nothing removed, everything removed, no poison, no clean sample) it is 0 as in
scikit-learn, not torchmetrics' limit values (Chicco et al.), which give a filter that removes nothing a
positive MCC.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    BinaryPrecision,
    BinaryRecall,
    BinaryStatScores,
)
from torchmetrics.functional.classification import (
    binary_f1_score,
    binary_matthews_corrcoef,
    binary_precision,
    binary_recall,
    binary_stat_scores,
)

__all__ = ["PoisonDetection", "poison_detection_scores"]


def _check(removed: torch.Tensor, poisoned: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened integer ``(preds, target)`` for torchmetrics, after the shape check."""
    if not (torch.is_tensor(removed) and torch.is_tensor(poisoned)):
        raise TypeError("removed and poisoned must be boolean tensors")
    if removed.shape != poisoned.shape:
        raise ValueError(f"removed and poisoned must have the same shape, got {tuple(removed.shape)} "
                         f"and {tuple(poisoned.shape)}")
    return removed.bool().flatten().long(), poisoned.bool().flatten().long()


def _assemble(precision: torch.Tensor, recall: torch.Tensor, f1: torch.Tensor, mcc: torch.Tensor,
              stats: torch.Tensor) -> dict[str, torch.Tensor]:
    tp, fp, tn, fn, _ = stats.double().unbind()
    if float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) == 0:
        mcc = torch.zeros((), dtype=torch.float64)
    # In float64 from torchmetrics' counts (1 - float32 specificity loses digits); no clean sample: no FP.
    fpr = fp / (fp + tn) if float(fp + tn) > 0 else torch.zeros((), dtype=torch.float64)
    return {
        "detection_rate": recall.double(),
        "precision": precision.double(),
        "recall": recall.double(),
        "f1": f1.double(),
        "mcc": mcc.double(),
        "clean_removed": fp,
        "false_positive_rate": fpr,
        "poisons_removed": tp,
        "poisons_kept": fn,
    }


def poison_detection_scores(removed: torch.Tensor, poisoned: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detection rate, precision, recall, F1, MCC and clean-removal counts of one filtering decision.

    Args:
        removed: BoolTensor, ``True`` where the filter dropped the sample.
        poisoned: BoolTensor of the same shape, ``True`` where the sample is a poison.

    Raises:
        ValueError: if the shapes differ.

    Example:
        >>> s = poison_detection_scores(~keep, is_poison)
        >>> float(s["detection_rate"]), int(s["clean_removed"])
    """
    preds, target = _check(removed, poisoned)
    stats = binary_stat_scores(preds, target)
    return _assemble(binary_precision(preds, target, zero_division=0), binary_recall(preds, target, zero_division=0),
                     binary_f1_score(preds, target, zero_division=0), binary_matthews_corrcoef(preds, target), stats)


class PoisonDetection(MetricCollection):
    """torchmetrics' binary precision, recall, F1, MCC and stat scores, accumulated across batches
    and processes; :meth:`compute` returns the dict of :func:`poison_detection_scores`.

    Example:
        >>> metric = PoisonDetection()
        >>> metric.update(removed=~keep, poisoned=is_poison)
        >>> metric.compute()["mcc"]
    """

    def __init__(self) -> None:
        super().__init__({
            "precision": BinaryPrecision(zero_division=0),
            "recall": BinaryRecall(zero_division=0),
            "f1": BinaryF1Score(zero_division=0),
            "mcc": BinaryMatthewsCorrCoef(),
            "stats": BinaryStatScores(),
        })

    def update(self, removed: torch.Tensor, poisoned: torch.Tensor) -> None:  # type: ignore[override]
        """Add one batch of decisions: ``removed`` and ``poisoned`` are boolean tensors of equal shape."""
        preds, target = _check(removed, poisoned)
        super().update(preds, target)

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        out = super().compute()
        return _assemble(out["precision"], out["recall"], out["f1"], out["mcc"], out["stats"])
