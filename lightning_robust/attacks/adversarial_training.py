"""Adversarial training as pure helpers; :class:`~lightning_robust.objectives.AdversarialTraining` is the shell.

Three ways to train on adversarial examples:

* ``"pgd"`` (Madry et al. 2018, arXiv 1706.06083): minimize ``E max_{δ ∈ S} L(f(x + δ), y)`` with the inner
  maximization approximated by the given attack (PGD-7 with step 2/255 at ``eps = 8/255`` on CIFAR-10).
* ``"fast"`` (Wong, Rice & Kolter 2020, arXiv 2001.03994): the inner maximization is one FGSM step of size
  ``1.25 eps`` from a uniformly random start in the ball, on the attack's threat model.
* ``"free"`` (Shafahi et al. 2019, arXiv 1904.12843): each minibatch is replayed ``m`` times; every replay's
  single backward pass gives both the weight gradient (one optimizer step) and the input gradient, which
  updates a perturbation ``δ ← Proj(δ + eps · sign(∇_x L))`` carried over to the next replay and the next
  minibatch.

Catastrophic overfitting (fast training suddenly losing all PGD robustness) is caught by a trip-wire:
PGD accuracy on a few held training batches after each epoch, with an optional early stop when it falls
more than a tolerance below its best (Wong et al., Section 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.attacks.base import Attack
from lightning_robust.attacks.pgd import FGSM, PGD
from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.validation import check_positive

__all__ = ["ADVERSARIAL_MODES", "check_lp_threat", "default_tripwire_attack", "fast_attack", "free_delta_update",
           "robust_correct", "tripwire_tripped"]

ADVERSARIAL_MODES = ("fast", "free", "pgd")


def check_lp_threat(attack: Attack, what: str) -> None:
    """Raise a ``ValueError`` unless ``attack`` is an L-inf or L2 attack (``what`` names the training mode)."""
    if attack.threat.norm not in ("linf", "l2"):
        raise ValueError(f"adversarial_mode={what!r} needs an L-inf or L2 attack (its eps and norm define the "
                         f"perturbation), got {type(attack).__name__} with norm {attack.threat.norm!r}")


def fast_attack(attack: Attack, alpha: float | None = None) -> FGSM:
    """FGSM with random start on ``attack``'s threat model; step ``alpha`` (default ``1.25 eps``, Wong et al.).

    Raises:
        ValueError: if ``attack`` is not an L-inf or L2 attack.
    """
    check_lp_threat(attack, "fast")
    if alpha is not None:
        check_positive("fast_alpha", alpha)
    return FGSM(eps=attack.threat.eps, alpha=alpha, norm=attack.threat.norm, random_start=True,
                model_mode=attack.model_mode, low=attack.threat.low, high=attack.threat.high)


def free_delta_update(delta: torch.Tensor, grad: torch.Tensor, attack: Attack) -> torch.Tensor:
    """One "free" perturbation step: ``δ + eps · s(g)`` projected onto the attack's ball.

    ``s`` is the sign for L-inf (Shafahi et al.'s rule, step = eps) and ``g / ||g||_2`` for L2.
    """
    check_lp_threat(attack, "free")
    eps = attack.threat.eps
    if attack.threat.norm == "linf":
        step = grad.sign()
    else:
        n = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        step = grad / n.view(-1, *([1] * (grad.ndim - 1)))
    return attack.threat.project_delta(delta + eps * step)


def default_tripwire_attack(attack: Attack) -> PGD:
    """PGD-10 with step ``eps / 4`` and a random start on ``attack``'s threat model (the trip-wire's default)."""
    check_lp_threat(attack, "pgd trip-wire")
    eps = attack.threat.eps
    return PGD(eps=eps, alpha=eps / 4 if eps > 0 else None, steps=10, norm=attack.threat.norm, random_start=True,
               low=attack.threat.low, high=attack.threat.high)


def robust_correct(model: nn.Module, attack: Attack, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                   generator: torch.Generator | None = None) -> tuple[int, int]:
    """``(samples still classified correctly under attack, samples)`` over ``batches``; model in eval mode."""
    correct = total = 0
    for x, y in batches:
        x_adv = attack(model, x, y, generator=generator)
        with torch.no_grad(), model_mode(model, "eval"):
            correct += int((model(x_adv).argmax(1) == y).sum())
        total += int(y.numel())
    return correct, total


def tripwire_tripped(history: Sequence[float], max_drop: float | None) -> bool:
    """True when the last trip-wire accuracy is more than ``max_drop`` below the best one before it."""
    if max_drop is None or len(history) < 2:
        return False
    return history[-1] < max(history[:-1]) - max_drop
