"""Distillation onto adversarial examples: the ARD objective (Goldblum et al., AAAI 2020, arXiv 1905.09747).

``L(θ) = α τ² KL(softmax(T(x)/τ) ‖ softmax(S_θ(x')/τ)) + (1 − α) CE(S_θ(x), y)``, with ``x'`` the current
training inputs: adversarial examples when an :class:`~lightning_robust.objectives.AdversarialTraining`
objective (with ``weight=0``) comes before this one (ARD, fast ARD), the clean images otherwise (plain
knowledge distillation, Hinton et al., arXiv 1503.02531). The teacher only ever sees clean images.

``reduction="batchmean"`` is the equation's per-sample KL averaged over the batch; ``"mean"`` is the authors'
``nn.KLDivLoss()`` element mean, ``1/C`` of it (to reuse the paper's learning rate with the same step).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.objectives.base import Objective, ObjectiveOutput, TrainingBatch
from lightning_robust.utils.checkpoint import load_module
from lightning_robust.utils.validation import check_choice, check_fraction, check_positive

__all__ = ["KL_REDUCTIONS", "Distillation", "ard_loss", "distillation_kl", "resolve_teacher", "teacher_fingerprint"]

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


class Distillation(Objective):
    """The ARD / knowledge-distillation loss of the student on the current inputs against a frozen teacher.

    The teacher is frozen (``requires_grad=False``), run in eval mode under ``no_grad`` on the clean images
    only (once per minibatch, also when free training replays it), and kept out of the module tree: it is an
    attribute of this objective, not a submodule of the student, so neither the optimizer, DDP nor the state
    dict see it. Its logits are handed back in the student's dtype.

    Args:
        teacher: the teacher: an ``nn.Module`` or the path of a weights-only checkpoint (a state dict or a
            Lightning checkpoint of e.g. a :class:`~lightning_robust.models.Classifier`) loaded into
            ``teacher_net``.
        teacher_net: the teacher's architecture, required when ``teacher`` is a path.
        temperature: distillation temperature τ (paper: 30).
        alpha: weight of the distillation term; ``1 - alpha`` weighs clean cross-entropy (paper: 1).
        kl_reduction: ``"batchmean"`` (the true KL) or ``"mean"`` (the authors' ``1/C`` scale).

    Raises:
        ValueError: a teacher whose class count differs from the student's, a path without ``teacher_net``,
            or a bad number. ``CheckpointError`` (a ValueError): a teacher checkpoint that is missing, not
            weights-only or does not fit ``teacher_net``.

    Example:
        >>> Classifier(student, objectives=[AdversarialTraining(PGD(eps=8/255, alpha=2/255, steps=10), weight=0),
        ...                                 Distillation(teacher, temperature=30.0)])
    """

    def __init__(self, teacher: nn.Module | str, teacher_net: nn.Module | None = None, temperature: float = 30.0,
                 alpha: float = 1.0, kl_reduction: str = "batchmean") -> None:
        self.temperature = float(check_positive("temperature", temperature))
        self.alpha = float(check_fraction("alpha", alpha, inclusive_high=True))
        self.kl_reduction = check_choice("kl_reduction", kl_reduction, KL_REDUCTIONS)
        module = resolve_teacher(teacher, teacher_net)
        module.requires_grad_(False)
        module.eval()
        self.teacher = module
        self.num_classes: int | None = None

    def setup(self, module: nn.Module, num_classes: int) -> None:
        n = getattr(self.teacher, "num_classes", None)
        if isinstance(n, int) and n != num_classes:
            raise ValueError(f"teacher has {n} classes but the student has {num_classes}; "
                             "ARD needs teacher and student to predict the same classes")
        self.num_classes = num_classes

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
        if self.num_classes is not None and (logits.ndim != 2 or logits.shape[1] != self.num_classes):
            raise ValueError(f"teacher outputs logits of shape {tuple(logits.shape)} but the student has "
                             f"{self.num_classes} classes; ARD needs teacher and student to predict the same classes")
        return logits

    def __call__(self, module: nn.Module, batch: TrainingBatch) -> ObjectiveOutput:
        t_logits = batch.cache.get("teacher_logits")
        if t_logits is None:
            t_logits = batch.cache["teacher_logits"] = self.teacher_logits(batch.x)
        adv_logits = batch.input_logits(module)
        clean_logits = batch.forward(module, batch.x) if self.alpha < 1 else None
        loss = ard_loss(adv_logits, t_logits, clean_logits, batch.y, self.temperature, self.alpha, self.kl_reduction)
        return loss, {}


def teacher_fingerprint(module: nn.Module) -> float:
    """A cheap fingerprint of a module's weights: a fixed-weight sum of all floating-point tensors."""
    total = 0.0
    for i, t in enumerate(module.state_dict().values()):
        if t.is_floating_point():
            total += float(t.detach().double().sum()) * (1 + (i % 7) / 7)
    return total


def resolve_teacher(teacher: nn.Module | str | os.PathLike, teacher_net: nn.Module | None) -> nn.Module:
    """The teacher module: ``teacher`` itself, or its weights-only checkpoint loaded into ``teacher_net``."""
    if isinstance(teacher, nn.Module):
        return teacher
    if not isinstance(teacher, (str, os.PathLike)):
        raise TypeError(f"teacher must be an nn.Module or a checkpoint path, got {type(teacher).__name__}")
    if teacher_net is None:
        raise ValueError(f"teacher={str(teacher)!r} is a checkpoint path: teacher_net (the teacher's "
                         "architecture) must be given, since weights-only checkpoints store no code")
    return load_module(teacher, into=teacher_net)
