"""How well a poison filter separates poisons from clean samples (the scores of Peri et al., arXiv 1909.13374).

Positive = poisoned, predicted positive = removed by the filter. From the confusion counts
``TP`` (poisons removed), ``FN`` (poisons kept), ``FP`` (clean samples removed), ``TN`` (clean kept):

* detection rate = recall = ``TP / (TP + FN)``;
* precision = ``TP / (TP + FP)``; F1 = ``2 P R / (P + R)``;
* MCC = ``(TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN))``;
* clean removed = ``FP`` and its share ``FP / (FP + TN)`` (false-positive rate).

A ratio whose denominator is zero is reported as 0 (scikit-learn's ``zero_division=0``).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["PoisonDetection", "poison_detection_scores"]


def _confusion(removed: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor:
    """``[TP, FP, TN, FN]`` as a long tensor."""
    if removed.shape != poisoned.shape:
        raise ValueError(f"removed and poisoned must have the same shape, got {tuple(removed.shape)} "
                         f"and {tuple(poisoned.shape)}")
    r, p = removed.bool().flatten(), poisoned.bool().flatten()
    return torch.stack([(r & p).sum(), (r & ~p).sum(), (~r & ~p).sum(), (~r & p).sum()]).long()


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))


def _scores(tp: torch.Tensor, fp: torch.Tensor, tn: torch.Tensor, fn: torch.Tensor) -> dict[str, torch.Tensor]:
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    f1 = _ratio(2 * precision * recall, precision + recall)
    den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).double().sqrt()
    mcc = _ratio(tp.double() * tn.double() - fp.double() * fn.double(), den)
    return {
        "detection_rate": recall,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "mcc": mcc,
        "clean_removed": fp.double(),
        "false_positive_rate": _ratio(fp, fp + tn),
        "poisons_removed": tp.double(),
        "poisons_kept": fn.double(),
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
    tp, fp, tn, fn = _confusion(removed, poisoned)
    return _scores(tp, fp, tn, fn)


class PoisonDetection(Metric):
    """torchmetrics ``Metric`` accumulating the confusion counts of a poison filter across batches and
    processes; :meth:`compute` returns the dict of :func:`poison_detection_scores`.

    Example:
        >>> metric = PoisonDetection()
        >>> metric.update(removed=~keep, poisoned=is_poison)
        >>> metric.compute()["mcc"]
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    tp: torch.Tensor
    fp: torch.Tensor
    tn: torch.Tensor
    fn: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        for name in ("tp", "fp", "tn", "fn"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, removed: torch.Tensor, poisoned: torch.Tensor) -> None:
        """Add one batch of decisions: ``removed`` and ``poisoned`` are boolean tensors of equal shape."""
        counts = _confusion(removed, poisoned).to(self.tp.device)
        self.tp += counts[0]
        self.fp += counts[1]
        self.tn += counts[2]
        self.fn += counts[3]

    def compute(self) -> dict[str, torch.Tensor]:
        return _scores(self.tp, self.fp, self.tn, self.fn)
