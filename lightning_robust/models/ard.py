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
The authors' code used ``nn.KLDivLoss()`` with its old default element-mean, which divides the KL by the
number of classes ``C`` as well: its loss (and gradient) is ``1/C`` of the equation's. ``kl_reduction="mean"``
reproduces that scale (e.g. to reuse the paper's learning rate with the exact same effective step).

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

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_robust.attacks import PGD, Attack
from lightning_robust.models.classifier import Classifier, _num_classes_of
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.checkpoint import load_module
from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.validation import check_choice, check_fraction, check_positive, check_seed

__all__ = ["ARD_MODES", "ARDStudent", "KL_REDUCTIONS", "ard_loss", "distillation_kl", "paper_attack",
           "paper_optimizer", "paper_scheduler", "teacher_fingerprint"]

ARD_MODES = ("clean", "fast", "free", "pgd")
KL_REDUCTIONS = ("batchmean", "mean")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 30.0,
                    reduction: str = "batchmean") -> torch.Tensor:
    """``τ² KL(softmax(t/τ) ‖ softmax(s/τ))`` reduced over the batch.

    Args:
        student_logits, teacher_logits: ``[N, C]`` logits (the teacher's are treated as constants).
        temperature: ``τ > 0``; the ``τ²`` factor keeps gradient magnitudes comparable across temperatures.
        reduction: ``"batchmean"`` (sum over classes, mean over samples: the true KL) or ``"mean"`` (mean over
            all ``N·C`` elements, the authors' code: ``1/C`` of ``"batchmean"``).

    Raises:
        ValueError: on mismatched shapes, a non-positive temperature or an unknown reduction.
    """
    check_positive("temperature", temperature)
    check_choice("kl_reduction", reduction, KL_REDUCTIONS)
    if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits must both be [N, C] with the same shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    p_teacher = F.softmax(teacher_logits.detach() / temperature, dim=1)
    # Element-wise KL terms summed over classes, then reduced explicitly: F.kl_div(reduction="mean") warns that
    # it is not the true KL, and the authors' element mean is exactly that sum divided by N·C.
    per_sample = F.kl_div(log_p_student, p_teacher, reduction="none").sum(dim=1)
    kl = per_sample.mean() if reduction == "batchmean" else per_sample.mean() / student_logits.shape[1]
    return temperature**2 * kl


def ard_loss(student_adv_logits: torch.Tensor, teacher_logits: torch.Tensor,
             student_clean_logits: torch.Tensor | None = None, y: torch.Tensor | None = None,
             temperature: float = 30.0, alpha: float = 1.0, reduction: str = "batchmean") -> torch.Tensor:
    """The ARD objective ``α τ² KL(T(x)/τ ‖ S(x+δ)/τ) + (1 − α) CE(S(x), y)`` (arXiv 1905.09747, Eq. 3).

    Args:
        student_adv_logits: the student's logits on the adversarial examples ``x + δ``.
        teacher_logits: the teacher's logits on the clean images ``x`` (constants).
        student_clean_logits: the student's logits on ``x``; needed only when ``alpha < 1``.
        y: labels; needed only when ``alpha < 1``.
        temperature, reduction: see :func:`distillation_kl`.
        alpha: weight in [0, 1] of the distillation term.

    Raises:
        ValueError: on a bad ``alpha``, or ``alpha < 1`` without clean logits and labels.

    Example:
        >>> loss = ard_loss(student(x_adv), teacher(x).detach(), temperature=30.0, alpha=1.0)
    """
    check_fraction("alpha", alpha, inclusive_high=True)
    loss = alpha * distillation_kl(student_adv_logits, teacher_logits, temperature, reduction) if alpha > 0 else None
    if alpha < 1:
        if student_clean_logits is None or y is None:
            raise ValueError("ard_loss with alpha < 1 needs student_clean_logits and y for the cross-entropy term")
        ce = (1 - alpha) * F.cross_entropy(student_clean_logits, y)
        loss = ce if loss is None else loss + ce
    assert loss is not None
    return loss


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
        kl_reduction: ``"batchmean"`` (default, the true KL) or ``"mean"`` (the authors' ``1/C`` scale).
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
        check_positive("temperature", temperature)
        check_fraction("alpha", alpha, inclusive_high=True)
        check_choice("kl_reduction", kl_reduction, KL_REDUCTIONS)
        if attack is None and adversarial_mode != "clean":
            attack = paper_attack()
        teacher_module = _resolve_teacher(teacher, teacher_net)
        extra: dict[str, Any] = {} if optimizer is None else {"optimizer": optimizer}
        with warnings.catch_warnings():
            # Classifier's save_hyperparameters sees this frame's modules; they are dropped just below.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`")
            super().__init__(
                student,
                num_classes=num_classes,
                scheduler=scheduler,
                scheduler_interval=scheduler_interval,
                attack=None if adversarial_mode == "clean" else attack,
                adversarial_mode="pgd" if adversarial_mode == "clean" else adversarial_mode,
                free_replays=free_replays,
                fast_alpha=fast_alpha,
                **extra,
            )
        teacher_classes = _num_classes_of(teacher_module)
        if teacher_classes is not None and teacher_classes != self.num_classes:
            raise ValueError(f"teacher has {teacher_classes} classes but the student has {self.num_classes}; "
                             "ARD needs teacher and student to predict the same classes")
        # Classifier's save_hyperparameters also collects this constructor's arguments (modules among them):
        # start again with primitives only, so checkpoints load with torch.load(weights_only=True).
        self._hparams = type(self.hparams)()
        self.save_hyperparameters(ignore=["student", "teacher", "teacher_net", "attack", "optimizer", "scheduler"])
        self.hparams["num_classes"] = self.num_classes
        if isinstance(teacher, (str, os.PathLike)):
            self.hparams["teacher"] = str(teacher)
        self.distill_mode = adversarial_mode
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.kl_reduction = kl_reduction
        self.seed = int(seed)
        teacher_module.requires_grad_(False)
        teacher_module.eval()
        # Bypass nn.Module registration: the teacher is an input, not a part of the trained model.
        object.__setattr__(self, "_teacher", teacher_module)
        self.teacher_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.teacher_accuracy: float | None = None
        self._teacher_acc_pending = False

    @property
    def teacher(self) -> nn.Module:
        """The frozen teacher (not a submodule: not in ``parameters()`` nor in the state dict)."""
        teacher: nn.Module = self.__dict__["_teacher"]
        return teacher

    @property
    def student(self) -> nn.Module:
        return self.net

    # ---- maths -----------------------------------------------------------------------------------------
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on clean ``x`` (eval mode, no gradient); checks the class count."""
        teacher = self.teacher
        first = next(teacher.parameters(), None)
        if first is not None and first.device != x.device:
            teacher.to(x.device)
        teacher.eval()
        with torch.no_grad():
            # The teacher keeps its own dtype (e.g. float32 under precision="bf16-true", which only casts the
            # registered student): feed it that dtype and hand back logits in the student's.
            x_in = x.to(first.dtype) if first is not None and x.is_floating_point() else x
            logits = teacher(x_in).to(x.dtype if x.is_floating_point() else torch.get_default_dtype())
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"teacher outputs logits of shape {tuple(logits.shape)} but the student has "
                             f"{self.num_classes} classes; ARD needs teacher and student to predict the same classes")
        return logits

    def step_generator(self, device: torch.device) -> torch.Generator:
        """Random starts of this step: keyed by (seed, global step, rank), so a resumed run draws the same."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        step = self.trainer.global_step if self._trainer is not None else 0
        generator = torch.Generator(device=device)
        generator.manual_seed((self.seed * 1_000_003 + step * 7_919 + rank) % (2**63 - 1))
        return generator

    def _loss(self, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor,
              t_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        adv_logits = self(x_adv)
        clean_logits = self(x) if self.alpha < 1 else None
        loss = ard_loss(adv_logits, t_logits, clean_logits, y, self.temperature, self.alpha, self.kl_reduction)
        return loss, adv_logits, {}

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """ARD loss of a batch: ``x_adv`` from the (PGD or fast) attack on the student, teacher on clean ``x``."""
        t_logits = self.teacher_logits(x)
        x_adv = x
        if self.train_attack is not None:
            x_adv = self.train_attack(self, x, y, generator=self.step_generator(x.device))
        return self._loss(x, x_adv, y, t_logits)

    def _free_training_step(self, x: torch.Tensor,
                            y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Free ARD: ``free_replays`` optimizer steps on this minibatch; one backward gives both gradients."""
        t_logits = self.teacher_logits(x)  # the teacher sees clean x only: once per minibatch
        return self._free_replays(x, lambda x_adv: self._loss(x, x_adv, y, t_logits))

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


def teacher_fingerprint(module: nn.Module) -> float:
    """A cheap fingerprint of a module's weights: a fixed-weight sum of all floating-point tensors."""
    total = 0.0
    for i, t in enumerate(module.state_dict().values()):
        if t.is_floating_point():
            total += float(t.detach().double().sum()) * (1 + (i % 7) / 7)
    return total


def _resolve_teacher(teacher: nn.Module | str | os.PathLike, teacher_net: nn.Module | None) -> nn.Module:
    if isinstance(teacher, nn.Module):
        return teacher
    if not isinstance(teacher, (str, os.PathLike)):
        raise TypeError(f"teacher must be an nn.Module or a checkpoint path, got {type(teacher).__name__}")
    if teacher_net is None:
        raise ValueError(f"teacher={str(teacher)!r} is a checkpoint path: teacher_net (the teacher's "
                         "architecture) must be given, since weights-only checkpoints store no code")
    return load_module(teacher, into=teacher_net)
