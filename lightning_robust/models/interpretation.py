"""Interpretation-regularized (adversarial) training (Levine, Singla & Feizi, arXiv 1905.12105 v1, App. D)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lightning_robust.attacks.base import Attack
from lightning_robust.interpret.attack import TopKSaliencyAttack
from lightning_robust.interpret.saliency import topk_intersection
from lightning_robust.models.classifier import Classifier, default_optimizer
from lightning_robust.utils.validation import check_choice, check_fraction, check_non_negative

__all__ = ["InterpretationRegularizedClassifier", "saliency_difference"]


def _unit(a: torch.Tensor) -> torch.Tensor:
    flat = a.flatten(1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def saliency_difference(g_natural: torch.Tensor, g_perturbed: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean_i (n(|g|)_i - n(|g'|)_i)²`` with ``n`` the per-sample L2 normalization ([B]).

    The paper's penalty (the authors' ``MSELoss`` between unit-norm absolute gradient maps), per sample.
    """
    return (_unit(g_natural.abs()) - _unit(g_perturbed.abs())).pow(2).mean(1)


@contextlib.contextmanager
def _running_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Batch-norm layers keep normalising with batch statistics but leave their running statistics alone."""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training:
            saved.append((m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()))
            m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class InterpretationRegularizedClassifier(Classifier):
    """Cross-entropy training plus a penalty on how much an adversary can change the saliency map.

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
        super().__init__(net, num_classes=num_classes, optimizer=optimizer, scheduler=scheduler,
                         scheduler_interval=scheduler_interval, scheduler_monitor=scheduler_monitor,
                         label_smoothing=label_smoothing)
        check_non_negative("saliency_weight", saliency_weight)
        check_choice("perturbation", perturbation, ("interpretation", "attack"))
        check_fraction("topk_fraction", topk_fraction, inclusive_low=False, inclusive_high=True)
        for name, value in (("attack", attack), ("interpretation_attack", interpretation_attack)):
            if value is not None and not isinstance(value, Attack):
                raise TypeError(f"{name} must be an Attack or None, got {type(value).__name__}")
        if perturbation == "attack" and attack is None:
            raise ValueError("perturbation='attack' needs an attack (e.g. PGD) to produce the perturbed inputs")
        # The parent's save_hyperparameters also collected this class's arguments: redo it so that no
        # attack object lands in the checkpoint (weights_only loading).
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "attack", "interpretation_attack"])
        self.hparams["num_classes"] = self.num_classes
        self.saliency_weight = float(saliency_weight)
        self.attack = attack
        self.perturbation = perturbation
        if perturbation == "interpretation" and interpretation_attack is None:
            interpretation_attack = TopKSaliencyAttack()
        self.interpretation_attack = interpretation_attack
        self.topk_fraction = float(topk_fraction)

    def _perturbed(self, x: torch.Tensor, y: torch.Tensor, x_ce: torch.Tensor) -> torch.Tensor:
        if self.perturbation == "attack":
            return x_ce
        assert self.interpretation_attack is not None
        return self.interpretation_attack(self, x, y)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        x_ce = self.attack(self, x, y) if self.attack is not None else x
        logits = self(x_ce)
        ce = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.saliency_weight == 0:
            return ce, logits, {}
        x_pert = self._perturbed(x, y, x_ce).detach()
        valid = (x_pert != x).flatten(1).any(1)
        B = x.shape[0]
        if x_ce is x:
            cls = logits.detach().argmax(1)
        else:
            with torch.no_grad():
                cls = self(x).argmax(1)
        both = torch.cat([x, x_pert]).detach().requires_grad_(True)
        with _running_stats_frozen(self.net):
            # The penalty's forward sees perturbed inputs: it must not move BatchNorm's running statistics
            # (the cross-entropy forward above already updated them once for this batch).
            z = self(both)
        # create_graph: the saliency maps stay functions of the weights (double backpropagation).
        (g,) = torch.autograd.grad(z.gather(1, cls.repeat(2)[:, None]).sum(), both, create_graph=True)
        per_sample = saliency_difference(g[:B], g[B:])
        penalty = (per_sample * valid).sum() / valid.sum().clamp_min(1)
        loss = ce + self.saliency_weight * penalty if self.saliency_weight > 0 else ce
        with torch.no_grad():
            k = max(1, int(self.topk_fraction * x[0].numel()))
            overlap = topk_intersection(g[:B].detach(), g[B:].detach(), k).double() / k
            # Samples the attack could not move keep their map: they count as full overlap.
            overlap = overlap.mean()
        return loss, logits, {"saliency_penalty": penalty.detach(), "saliency_topk": overlap.float()}
