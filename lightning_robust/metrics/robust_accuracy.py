"""Accuracy under attack as a torchmetrics metric (summed over processes)."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import Metric

from lightning_robust.attacks import Attack
from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.validation import check_finite

__all__ = ["RobustAccuracy"]


class RobustAccuracy(Metric):
    """Fraction of samples that a model still classifies correctly after an attack.

    ``update(model, x, y)`` runs ``attack`` on the batch (or uses ``x_adv`` when given; with
    ``attack=None`` it measures clean accuracy) and counts correct predictions on the result, in eval mode;
    ``compute()`` returns ``correct / total`` summed over every process (``dist_reduce_fx="sum"``), so a
    DDP evaluation equals a single-process one over the same samples. This is the usual "accuracy on
    adversarial examples" (a clean error counts as an error only if the attacked input is also
    misclassified), which lets an evaluation notice an attack that *raises* accuracy.

    Args:
        attack: the attack to evaluate, or ``None`` for clean accuracy.

    Example:
        >>> metric = RobustAccuracy(PGD(eps=8/255, alpha=2/255, steps=20))
        >>> for x, y in loader:
        ...     metric.update(model, x, y)
        >>> metric.compute()
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, attack: Attack | None = None) -> None:
        super().__init__()
        if attack is not None and not isinstance(attack, Attack):
            raise TypeError(f"attack must be an Attack or None, got {type(attack).__name__}")
        self.attack = attack
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> None:
        """Attack ``(x, y)`` (unless ``x_adv`` is given) and count the correct predictions on the result."""
        check_finite("x", x)
        check_finite("x_adv", x_adv)
        if x_adv is None:
            x_adv = self.attack(model, x, y, generator=generator) if self.attack is not None else x
        with torch.no_grad(), model_mode(model, "eval"):
            pred = model(x_adv).argmax(1)
        self.correct += (pred == y).sum().to(self.correct.device)
        self.total += torch.tensor(y.numel(), device=self.total.device)

    def compute(self) -> torch.Tensor:
        return self.correct.double() / self.total.clamp_min(1)
