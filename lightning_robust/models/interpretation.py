"""Interpretation-regularized (adversarial) training (Levine, Singla & Feizi, arXiv 1905.12105 v1, App. D).

The maths is :class:`~lightning_robust.objectives.SaliencyConsistency`; this module keeps the preset.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lightning_robust.attacks.base import Attack
from lightning_robust.models.classifier import Classifier, default_optimizer
from lightning_robust.objectives import AdversarialTraining, CrossEntropy, Objective, SaliencyConsistency
from lightning_robust.objectives.saliency_consistency import saliency_difference
from lightning_robust.utils.validation import check_choice, check_non_negative

__all__ = ["InterpretationRegularizedClassifier", "saliency_difference"]


class InterpretationRegularizedClassifier(Classifier):
    """Cross-entropy training plus a penalty on how much an adversary can change the saliency map.

    A preset of :class:`Classifier` with the objectives ``[CrossEntropy(label_smoothing)`` (or
    ``AdversarialTraining(attack)``) ``, SaliencyConsistency(saliency_weight, ...)]``
    (:mod:`lightning_robust.objectives`).

    ``loss = CE(f(x_ce), y) + λ · mean_{valid b} saliency_difference(∇ z_c(x_b), ∇ z_c(x'_b))`` where ``c`` is
    the class predicted at the natural input, ``∇ z_c`` the input gradient of its logit (kept in the graph:
    double backpropagation), ``x'`` the perturbed input and ``x_ce`` either the natural input (the paper's
    Appendix D) or, when ``attack`` is given, the classification adversary's output (adversarial training
    with the interpretation penalty on top). The penalty averages over the samples for which the
    perturbation actually moved the input (the paper drops samples on which its attack found no
    prediction-preserving start).

    ``perturbation`` picks ``x'``:

    * ``"interpretation"`` (paper): the :class:`~lightning_robust.interpret.TopKSaliencyAttack` given as
      ``interpretation_attack`` (default: ``TopKSaliencyAttack()``, the paper's settings), which removes
      saliency mass from the top-25% pixels while keeping the prediction. For ReLU networks it takes its
      gradients through a softplus twin of the network (``softplus_beta``), since their saliency map has
      zero input gradient almost everywhere. The penalty itself needs no such surrogate: its gradient with
      respect to the weights flows through the saliency map's dependence on them.
    * ``"attack"``: the classification adversarial examples of ``attack`` (abstract's formulation:
      saliency of natural versus adversarial samples).

    Logs ``train/saliency_penalty`` and ``train/saliency_topk`` (top-k overlap of the natural and perturbed
    maps, ``k = topk_fraction · d``; unmoved samples count as 1) besides the :class:`Classifier` metrics.
    ``saliency_weight=0`` skips the penalty (and its attack): with an ``attack`` that is plain adversarial
    training.

    Args:
        net: classifier network (logits out).
        num_classes: read from ``net`` when omitted.
        saliency_weight: ``λ`` (the paper sweeps 0 to 1000 on MNIST), >= 0.
        attack: optional classification attack for the cross-entropy term (e.g. ``PGD``).
        interpretation_attack: the attack producing ``x'`` when ``perturbation="interpretation"``.
        perturbation: ``"interpretation"`` or ``"attack"`` (needs ``attack``).
        topk_fraction: ``k / d`` of the logged top-k overlap, in (0, 1].
        optimizer, scheduler, scheduler_interval, scheduler_monitor, label_smoothing: as in :class:`Classifier`.

    Raises:
        ValueError: on a negative weight, an unknown ``perturbation``, or ``perturbation="attack"`` without
            an attack.

    Example:
        >>> model = InterpretationRegularizedClassifier(
        ...     SmallCNN(input_size=8), saliency_weight=200.0,
        ...     interpretation_attack=TopKSaliencyAttack(eps=1.0, steps=5, restarts=1))
        >>> pl.Trainer(max_epochs=5).fit(model, datamodule=DigitsDataModule())
    """

    hparams_ignore: ClassVar[tuple[str, ...]] = ("interpretation_attack",)

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        saliency_weight: float = 200.0,
        attack: Attack | None = None,
        interpretation_attack: Attack | None = None,
        perturbation: str = "interpretation",
        topk_fraction: float = 0.25,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        label_smoothing: float = 0.0,
    ) -> None:
        check_non_negative("saliency_weight", saliency_weight)
        check_choice("perturbation", perturbation, ("interpretation", "attack"))
        for name, value in (("attack", attack), ("interpretation_attack", interpretation_attack)):
            if value is not None and not isinstance(value, Attack):
                raise TypeError(f"{name} must be an Attack or None, got {type(value).__name__}")
        if perturbation == "attack" and attack is None:
            raise ValueError("perturbation='attack' needs an attack (e.g. PGD) to produce the perturbed inputs")
        first: Objective = (CrossEntropy(label_smoothing=label_smoothing) if attack is None
                            else AdversarialTraining(attack, "pgd", label_smoothing=label_smoothing))
        self_consistency = SaliencyConsistency(saliency_weight, interpretation_attack, perturbation, topk_fraction)
        super().__init__(net, num_classes=num_classes, optimizer=optimizer, scheduler=scheduler,
                         scheduler_interval=scheduler_interval, scheduler_monitor=scheduler_monitor,
                         objectives=[first, self_consistency])
        self.saliency = self_consistency

    @property
    def saliency_weight(self) -> float:
        return self.saliency.weight

    @property
    def interpretation_attack(self) -> Any:
        return self.saliency.interpretation_attack

    @property
    def perturbation(self) -> str:
        return self.saliency.perturbation

    @property
    def topk_fraction(self) -> float:
        return self.saliency.topk_fraction
