"""Saliency consistency: penalise how much a perturbation changes the saliency map (arXiv 1905.12105 v1, App. D).

``λ · mean_{valid b} saliency_difference(∇ z_c(x_b), ∇ z_c(x'_b))`` where ``c`` is the class predicted at the
natural input, ``∇ z_c`` the input gradient of its logit (kept in the graph: double backpropagation) and
``x'`` the perturbed input; the penalty averages over the samples the perturbation actually moved (the paper
drops samples on which its attack found no prediction-preserving start).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from lightning_robust.attacks.base import Attack
from lightning_robust.interpret.attack import TopKSaliencyAttack
from lightning_robust.interpret.saliency import topk_intersection
from lightning_robust.objectives.base import Objective, ObjectiveOutput, TrainingBatch
from lightning_robust.utils.validation import check_choice, check_fraction, check_non_negative

__all__ = ["SaliencyConsistency", "saliency_difference"]


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


class SaliencyConsistency(Objective):
    """``weight ·`` the saliency-map change under a perturbation, on top of the loss terms before it.

    ``perturbation`` picks ``x'``:

    * ``"interpretation"`` (paper): the :class:`~lightning_robust.interpret.TopKSaliencyAttack` given as
      ``interpretation_attack`` (default: ``TopKSaliencyAttack()``, the paper's settings), which removes
      saliency mass from the top-25% pixels while keeping the prediction. For ReLU networks it takes its
      gradients through a softplus twin of the network, since their saliency map has zero input gradient
      almost everywhere; the penalty itself needs no surrogate.
    * ``"attack"``: the current training inputs, i.e. the adversarial examples of an
      :class:`~lightning_robust.objectives.AdversarialTraining` objective earlier in the list (the abstract's
      formulation: saliency of natural versus adversarial samples).

    Logs ``saliency_penalty`` and ``saliency_topk`` (top-k overlap of the natural and perturbed maps,
    ``k = topk_fraction · d``; unmoved samples count as 1). ``weight=0`` skips the term and its attack.

    Args:
        weight: ``λ`` (the paper sweeps 0 to 1000 on MNIST), >= 0.
        interpretation_attack: the attack producing ``x'`` when ``perturbation="interpretation"``.
        perturbation: ``"interpretation"`` or ``"attack"``.
        topk_fraction: ``k / d`` of the logged top-k overlap, in (0, 1].

    Example:
        >>> Classifier(SmallCNN(input_size=8), objectives=[
        ...     CrossEntropy(), SaliencyConsistency(200.0, TopKSaliencyAttack(eps=1.0, steps=5, restarts=1))])
    """

    def __init__(self, weight: float = 200.0, interpretation_attack: Attack | None = None,
                 perturbation: str = "interpretation", topk_fraction: float = 0.25) -> None:
        self.weight = float(check_non_negative("saliency_weight", weight))
        self.perturbation = check_choice("perturbation", perturbation, ("interpretation", "attack"))
        self.topk_fraction = float(check_fraction("topk_fraction", topk_fraction, inclusive_low=False,
                                                  inclusive_high=True))
        if interpretation_attack is not None and not isinstance(interpretation_attack, Attack):
            raise TypeError(f"interpretation_attack must be an Attack or None, got "
                            f"{type(interpretation_attack).__name__}")
        if perturbation == "interpretation" and interpretation_attack is None:
            interpretation_attack = TopKSaliencyAttack()
        self.interpretation_attack = interpretation_attack

    def __call__(self, module: nn.Module, batch: TrainingBatch) -> ObjectiveOutput:
        x, y, x_ce = batch.x, batch.y, batch.inputs
        if self.weight == 0:
            return torch.zeros((), device=x.device, dtype=x.dtype), {}
        logits = batch.input_logits(module)
        if self.perturbation == "attack":
            x_pert = x_ce.detach()
        else:
            assert self.interpretation_attack is not None
            x_pert = self.interpretation_attack(module, x, y).detach()
        valid = (x_pert != x).flatten(1).any(1)
        B = x.shape[0]
        if x_ce is x:
            cls = logits.detach().argmax(1)
        else:
            with torch.no_grad():
                cls = module(x).argmax(1)
        both = torch.cat([x, x_pert]).detach().requires_grad_(True)
        with _running_stats_frozen(module):
            # The penalty's forward sees perturbed inputs: it must not move BatchNorm's running statistics
            # (the cross-entropy forward already updated them once for this batch).
            z = module(both)
        # create_graph: the saliency maps stay functions of the weights (double backpropagation).
        (g,) = torch.autograd.grad(z.gather(1, cls.repeat(2)[:, None]).sum(), both, create_graph=True)
        per_sample = saliency_difference(g[:B], g[B:])
        penalty = (per_sample * valid).sum() / valid.sum().clamp_min(1)
        with torch.no_grad():
            k = max(1, int(self.topk_fraction * x[0].numel()))
            # Samples the attack could not move keep their map: they count as full overlap.
            overlap = (topk_intersection(g[:B].detach(), g[B:].detach(), k).double() / k).mean()
        return self.weight * penalty, {"saliency_penalty": penalty.detach(), "saliency_topk": overlap.float()}
