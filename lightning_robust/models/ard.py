"""Adversarially Robust Distillation (Goldblum, Fowl, Feizi & Goldstein, AAAI 2020, arXiv 1905.09747).

ARD distils a robust teacher ``T`` into a small student ``S`` by matching, at temperature ``τ``, the
student's prediction on an adversarial example to the teacher's prediction on the clean image:

``L(θ) = α τ² KL(softmax(T(x)/τ) ‖ softmax(S_θ(x + δ)/τ)) + (1 − α) CE(S_θ(x), y)``,
``δ = argmax_{‖δ‖∞ ≤ ε} CE(S_θ(x + δ), y)`` (PGD on the *student*, the teacher only labels clean images).

Paper defaults (CIFAR-10): ε = 8/255, PGD-10 with step 2/255 and a random start, τ = 30, α = 1; SGD lr 0.1,
momentum 0.9, weight decay 2e-4, 200 epochs, lr × 0.1 at epochs 100 and 150. Robust accuracy is reported
under PGD-20. (In the paper's own notation the weights of the two terms are swapped; here ``alpha`` weighs
the distillation term, as in the authors' code, so ``alpha = 1`` is pure adversarial distillation.)

**KL reduction.** :func:`ard_loss` uses ``reduction="batchmean"`` by default: the per-sample KL divergence
averaged over the batch, which is what the equation says and does not depend on the number of classes.
The authors' ``main.py`` uses ``nn.KLDivLoss()``, whose default ``reduction="mean"`` averages over the batch
*and* the ``C`` classes: their loss (and gradient) is ``1/C`` of the equation's, so with plain SGD at their
learning rate (0.1 on CIFAR-10) a "batchmean" step is ``C = 10`` times theirs. ``kl_reduction="mean"``
reproduces their scale exactly; alternatively keep "batchmean" and divide the learning rate by ``C`` (the
same SGD step; weight decay then acts ``C`` times less, so "mean" is the faithful choice for the paper's
recipe, and ``configs/ard_cifar10.yaml`` uses it). With Adam the reduction hardly matters (Adam normalises
the gradient scale).

**Attack mode.** The authors attack the student while it is in train mode (their training loop calls
``net.train()`` once per epoch and runs PGD inside it): BatchNorm normalises the attack's forward passes
with batch statistics and updates its running statistics, and dropout is active. Our attacks run the model in
eval mode by default; ``attack_train_mode=True`` runs the training attack on the student in train mode as
the authors do (the module's flags are restored afterwards). It changes nothing for students without
BatchNorm or dropout.

Fast ARD (Section 5 of the paper) replaces the PGD-10 inner loop by a cheaper one:

* ``adversarial_mode="free"`` (after Shafahi et al., arXiv 1904.12843): every minibatch is replayed
  ``free_replays`` (m) times; each replay's single backward pass gives both the student's weight gradient
  (one optimizer step) and the input gradient of the ARD loss, which moves the carried perturbation
  ``δ ← Proj(δ + ε sign(∇_x L))`` for the next replay and the next minibatch. Run ``1/m`` of the epochs.
  The perturbation is saved in checkpoints (every rank's own), so resuming is exact.
* ``adversarial_mode="fast"`` (after Wong, Rice & Kolter, arXiv 2001.03994): FGSM with a uniform random start
  and step ``1.25 ε`` on the attack's threat model.

``adversarial_mode="clean"`` is plain knowledge distillation (Hinton et al., arXiv 1503.02531) with the same
loss at ``δ = 0``: the paper's "KD" baseline.

Deliberately not carried over from the authors' script: its uninitialised counter, its swapped
natural/robust labels in the evaluation printout, and PGD-10 evaluation where the paper reports PGD-20
(configs here evaluate with PGD-20 through :class:`~lightning_robust.callbacks.RobustnessEvaluation`).
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any, ClassVar

import torch
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_robust.attacks import PGD, Attack
from lightning_robust.models.classifier import Classifier
from lightning_robust.objectives import AdversarialTraining, Distillation, Objective
from lightning_robust.objectives.distillation import (
    KL_REDUCTIONS,
    ard_loss,
    distillation_kl,
    resolve_teacher,
    teacher_fingerprint,
)
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.validation import check_choice, check_seed

__all__ = ["ARD_MODES", "ARDStudent", "KL_REDUCTIONS", "ard_loss", "distillation_kl", "paper_attack",
           "paper_optimizer", "paper_scheduler", "resolve_teacher", "teacher_fingerprint"]

ARD_MODES = ("clean", "fast", "free", "pgd")


def paper_attack() -> PGD:
    """The paper's training attack: L-inf PGD-10, ε = 8/255, step 2/255, random start, CE on the student."""
    return PGD(eps=8 / 255, alpha=2 / 255, steps=10, norm="linf", random_start=True)


def paper_optimizer(params: Any) -> torch.optim.Optimizer:
    """The paper's optimizer: SGD, lr 0.1, momentum 0.9, weight decay 2e-4."""
    return torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)


def paper_scheduler(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The paper's schedule for 200 epochs: lr × 0.1 at epochs 100 and 150."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[100, 150], gamma=0.1)


class ARDStudent(Classifier):
    """Adversarially Robust Distillation of a frozen ``teacher`` into ``student`` (arXiv 1905.09747).

    A preset of :class:`Classifier`: its objectives are ``[AdversarialTraining(attack, adversarial_mode,
    weight=0), Distillation(teacher, ...)]`` (only ``[Distillation]`` in ``"clean"`` mode), see
    :mod:`lightning_robust.objectives`; this class adds the teacher's validation accuracy and its
    fingerprint in checkpoints.

    The teacher is frozen (``requires_grad=False``), always run in eval mode under ``no_grad``, and kept out
    of the module tree: it is not in ``parameters()`` (so neither the optimizer nor DDP ever see it), nor in
    the state dict (student checkpoints stay small; a fingerprint of its weights is saved and checked on
    resume). Validation logs ``val/teacher_acc`` once (the first validation epoch after sanity checking).

    Args:
        student: the small net to train (logits out, images in [0, 1]).
        teacher: the robust teacher: an ``nn.Module`` or the path of a weights-only checkpoint (a state
            dict or a Lightning checkpoint of e.g. a :class:`Classifier`) loaded into ``teacher_net``.
        teacher_net: the teacher's architecture, required when ``teacher`` is a path.
        num_classes: number of classes; read from ``student.num_classes`` when omitted.
        attack: the inner maximization on the student (default :func:`paper_attack`, PGD-10 at 8/255); in
            ``"fast"`` and ``"free"`` modes only its threat model (norm, ε, bounds) is used.
        temperature: distillation temperature τ (paper: 30).
        alpha: weight of the distillation term; ``1 - alpha`` weighs clean cross-entropy (paper: 1).
        kl_reduction: ``"batchmean"`` (default, the true KL) or ``"mean"`` (the authors' ``nn.KLDivLoss()``
            default: ``1/C`` of the true KL, and so of the SGD step).
        attack_train_mode: run the training attack with the student in train mode (BatchNorm batch
            statistics and running-stat updates, dropout on), as the authors' code does; default False (eval).
        adversarial_mode: ``"pgd"`` (ARD), ``"free"`` or ``"fast"`` (fast ARD), ``"clean"`` (plain KD).
        free_replays: minibatch replays m of the free mode.
        fast_alpha: FGSM step of the fast mode (default 1.25 ε).
        optimizer, scheduler, scheduler_interval: as in :class:`Classifier` (default Adam 1e-3; the paper's
            SGD is :func:`paper_optimizer` / :func:`paper_scheduler`, set in the configs).
        seed: seed of the attacks' random starts (one generator per step and rank, so resuming is exact).

    Raises:
        ValueError: a teacher whose number of classes differs from the student's, a path without
            ``teacher_net``, or a bad argument. ``CheckpointError`` (a ValueError): a teacher checkpoint
            that is missing, not weights-only or does not fit ``teacher_net``.

    Example:
        >>> teacher = Classifier.load_from_checkpoint(...).net  # or a path + teacher_net
        >>> model = ARDStudent(SmallCNN(input_size=8), teacher, attack=PGD(eps=0.1, alpha=0.025, steps=10))
        >>> pl.Trainer(max_epochs=20).fit(model, datamodule=DigitsDataModule())
    """

    hparams_ignore: ClassVar[tuple[str, ...]] = ("student", "teacher", "teacher_net")

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | str,
        teacher_net: nn.Module | None = None,
        num_classes: int | None = None,
        attack: Attack | None = None,
        temperature: float = 30.0,
        alpha: float = 1.0,
        kl_reduction: str = "batchmean",
        attack_train_mode: bool = False,
        adversarial_mode: str = "pgd",
        free_replays: int = 4,
        fast_alpha: float | None = None,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        seed: int = 0,
    ) -> None:
        check_seed("seed", seed)
        check_choice("adversarial_mode", adversarial_mode, ARD_MODES)
        if not isinstance(attack_train_mode, bool):
            raise ValueError(f"attack_train_mode must be a bool, got {attack_train_mode!r}")
        if attack is None and adversarial_mode != "clean":
            attack = paper_attack()
        if attack_train_mode and isinstance(attack, Attack):
            # A copy, so the caller's attack object (maybe shared with an evaluation callback) keeps its mode.
            attack = copy.copy(attack)
            attack.model_mode = "train"
        distillation = Distillation(teacher, teacher_net, temperature, alpha, kl_reduction)
        objectives: list[Objective] = [distillation]
        if adversarial_mode != "clean":
            # the inner maximisation on the student, with no cross-entropy term of its own (weight 0)
            assert attack is not None
            objectives.insert(0, AdversarialTraining(attack, adversarial_mode, fast_alpha, free_replays, weight=0.0))
        extra: dict[str, Any] = {} if optimizer is None else {"optimizer": optimizer}
        super().__init__(student, num_classes=num_classes, scheduler=scheduler, scheduler_interval=scheduler_interval,
                         objectives=objectives, attack_seed=seed, **extra)
        if isinstance(teacher, (str, os.PathLike)):
            self.hparams["teacher"] = str(teacher)
        self.distillation = distillation
        self.attack_train_mode = attack_train_mode
        self.seed = int(seed)
        self.distill_mode = adversarial_mode
        self.temperature = distillation.temperature
        self.alpha = distillation.alpha
        self.kl_reduction = distillation.kl_reduction
        self.teacher_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.teacher_accuracy: float | None = None
        self._teacher_acc_pending = False

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a submodule: not in ``parameters()`` nor in the state dict)."""
        return self.distillation.teacher

    @property
    def student(self) -> nn.Module:
        return self.net

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on clean ``x`` (eval mode, no gradient); checks the class count."""
        return self.distillation.teacher_logits(x)

    # ---- teacher accuracy, logged once ----------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._teacher_acc_pending = self.teacher_accuracy is None and not self.trainer.sanity_checking

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        logits = super().validation_step(batch, batch_idx)
        if self._teacher_acc_pending:
            x, y, _ = split_batch(batch)
            with model_mode(self.teacher, "eval"):
                self.teacher_acc.update(self.teacher_logits(x), y)
        return logits

    def on_validation_epoch_end(self) -> None:
        if self._teacher_acc_pending:
            self._teacher_acc_pending = False
            self.teacher_accuracy = float(self.teacher_acc.compute())  # synchronised over processes
            self.teacher_acc.reset()
            # Already the same on every rank; sync_dist only averages equal values (and quiets Lightning).
            self.log("val/teacher_acc", self.teacher_accuracy, sync_dist=True)

    # ---- checkpoint state -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ard"] = {"teacher_fingerprint": teacher_fingerprint(self.teacher),
                             "teacher_accuracy": self.teacher_accuracy}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ard", {})
        acc = state.get("teacher_accuracy")
        self.teacher_accuracy = None if acc is None else float(acc)
        saved = state.get("teacher_fingerprint")
        if saved is not None and abs(float(saved) - teacher_fingerprint(self.teacher)) > 1e-6 * (1 + abs(float(saved))):
            warnings.warn("ARDStudent: the teacher differs from the one this checkpoint was trained with "
                          "(weight fingerprints differ); resuming distils a different teacher", stacklevel=2)
