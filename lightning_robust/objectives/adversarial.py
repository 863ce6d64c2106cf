"""Adversarial training (PGD, fast FGSM, free) as an objective that replaces the training inputs.

* ``"pgd"`` (Madry et al. 2018, arXiv 1706.06083): ``min E max_{δ ∈ S} L(f(x + δ), y)``, the inner
  maximization approximated by the given attack (PGD-7 with step 2/255 at ``eps = 8/255`` on CIFAR-10).
* ``"fast"`` (Wong, Rice & Kolter 2020, arXiv 2001.03994): one FGSM step of size ``1.25 eps`` from a uniformly
  random start in the ball, on the attack's threat model.
* ``"free"`` (Shafahi et al. 2019, arXiv 1904.12843): each minibatch is replayed ``m`` times; every replay's
  single backward pass gives both the weight gradient (one optimizer step) and the input gradient, which
  updates ``δ ← Proj(δ + eps · sign(∇_x L))``, carried to the next replay and the next minibatch (and saved
  in checkpoints).

The maths live in :mod:`lightning_robust.attacks.adversarial_training`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.attacks import adversarial_training as adv
from lightning_robust.attacks.base import Attack
from lightning_robust.objectives.base import Objective, ObjectiveOutput, TrainingBatch
from lightning_robust.utils.validation import check_choice, check_fraction, check_non_negative, check_positive_int

__all__ = ["AdversarialTraining"]


class AdversarialTraining(Objective):
    """Replace the training inputs by adversarial examples and add ``weight · CE(f(x_adv), y)``.

    The objectives after this one in the list train on the adversarial examples too (e.g. a
    :class:`~lightning_robust.objectives.CertifiedRadius` term, or :class:`~lightning_robust.objectives.Distillation`
    with ``weight=0``, which is ARD: the adversarial inputs without a cross-entropy term).

    Args:
        attack: the attack (e.g. ``PGD(eps=8/255, alpha=2/255, steps=7)``); in ``"fast"`` and ``"free"`` modes
            only its threat model (L-inf or L2 norm, eps, bounds) is used.
        mode: ``"pgd"`` (run ``attack`` as given), ``"fast"`` or ``"free"`` (see the module docstring).
        fast_alpha: FGSM step of the fast mode (default ``1.25 eps``).
        free_replays: minibatch replays ``m`` of the free mode (run ``1/m`` of the epochs); the module
            switches to manual optimization.
        weight: factor of the cross-entropy term; 0 only perturbs the inputs.
        label_smoothing: cross-entropy label smoothing in [0, 1).

    Raises:
        TypeError: if ``attack`` is not an :class:`~lightning_robust.attacks.Attack`.
        ValueError: on an unknown mode, a fast/free mode with a non-Lp attack, or a bad number.

    Example:
        >>> Classifier(net, objectives=[AdversarialTraining(PGD(eps=0.1), mode="fast")])
    """

    state_key = "adversarial_training"
    per_rank_state = ("free_delta",)

    def __init__(self, attack: Attack, mode: str = "pgd", fast_alpha: float | None = None, free_replays: int = 4,
                 weight: float = 1.0, label_smoothing: float = 0.0) -> None:
        if not isinstance(attack, Attack):
            raise TypeError(f"attack must be an Attack, got {type(attack).__name__}")
        self.mode = check_choice("adversarial_mode", mode, adv.ADVERSARIAL_MODES)
        self.free_replays = check_positive_int("free_replays", free_replays)
        self.weight = float(check_non_negative("weight", weight))
        self.label_smoothing = float(check_fraction("label_smoothing", label_smoothing))
        self.attack = attack
        # The attack the inputs go through: the given one, or its fast variant; free mode perturbs in prepare().
        self.train_attack: Attack | None = None
        if mode == "pgd":
            self.train_attack = attack
        elif mode == "fast":
            self.train_attack = adv.fast_attack(attack, fast_alpha)
        else:
            adv.check_lp_threat(attack, "free")
        self.replays = self.free_replays if mode == "free" else 1
        self.delta: torch.Tensor | None = None  # free mode: the perturbation carried across minibatches
        self._current: torch.Tensor | None = None

    # ---- free mode ---------------------------------------------------------------------------------
    def _start_minibatch(self, x: torch.Tensor) -> None:
        n = x.shape[0]
        if self.delta is None or self.delta.shape[1:] != x.shape[1:] or self.delta.shape[0] < n:
            self.delta = torch.zeros_like(x)
        self.delta = self.delta.to(x.device)
        self._current = self.delta[:n]

    def prepare(self, module: nn.Module, batch: TrainingBatch) -> None:
        if self.mode == "free":
            if batch.replay == 0 or self._current is None:
                self._start_minibatch(batch.x)
            assert self._current is not None
            threat = self.attack.threat
            batch.inputs = (batch.x + self._current).clamp(threat.low, threat.high).detach().requires_grad_(True)
        elif self.train_attack is not None:
            batch.inputs = self.train_attack(module, batch.inputs, batch.y, generator=batch.generator)
            batch.logits = None

    def after_backward(self, batch: TrainingBatch) -> None:
        if self.mode != "free":
            return
        grad = batch.inputs.grad
        if grad is None:
            raise RuntimeError("free adversarial training needs the input gradient: no loss term depended on "
                               "the training inputs")
        assert self._current is not None and self.delta is not None
        self._current = adv.free_delta_update(self._current, grad, self.attack).detach()
        self.delta[: self._current.shape[0]] = self._current

    # ---- loss ----------------------------------------------------------------------------------------
    def __call__(self, module: nn.Module, batch: TrainingBatch) -> ObjectiveOutput:
        if self.weight == 0:
            return torch.zeros((), device=batch.y.device), {}
        loss = F.cross_entropy(batch.input_logits(module), batch.y, label_smoothing=self.label_smoothing)
        return (loss if self.weight == 1 else self.weight * loss), {}

    # ---- checkpoint state (free mode) ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {} if self.delta is None else {"free_delta": self.delta.detach()}

    def load_state_dict(self, state: Mapping[str, Any], rank: int = 0) -> None:
        delta = state.get("free_delta")
        if delta is not None:
            # saved as [ranks, *delta.shape]: every rank resumes with its own perturbation
            self.delta = delta[min(rank, delta.shape[0] - 1)].clone()
            self._current = None
