"""Adversarial training for text (Miyato et al. 2017; SPGD's interpretable variant, arXiv 1905.12864).

``λ · L(E[x] + r_adv, y)`` on top of the clean loss: ``r_adv`` from a
:class:`~lightning_robust.attacks.text.TextAttack` such as :class:`~lightning_robust.attacks.SPGD`, whose
per-word perturbations point toward neighbouring words (``mode="embedding"``), or the rounded adversarial
token sequences (``mode="tokens"``, discrete adversarial training).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.attacks.text import TextAttack
from lightning_robust.objectives.base import Objective, ObjectiveOutput, TrainingBatch
from lightning_robust.utils.validation import check_choice, check_fraction, check_non_negative

__all__ = ["PERTURBATION_MODES", "TEXT_ADVERSARIAL_MODES", "TextAdversarialTraining"]

TEXT_ADVERSARIAL_MODES = ("embedding", "tokens")
PERTURBATION_MODES = ("train", "attack")


class TextAdversarialTraining(Objective):
    """``weight · CE(f(adversarial text), y)``; the clean inputs stay the training inputs.

    The module follows the text-net convention (``module(input_ids, attention_mask)``,
    ``module(inputs_embeds=..., attention_mask=...)``, ``module.get_input_embeddings()``), e.g.
    :class:`~lightning_robust.models.TextClassifier`. Logs ``clean_loss`` (the unweighted clean
    cross-entropy), ``adv_loss``, ``words_perturbed`` and the accuracy ``adv_acc``.

    Args:
        attack: the training attack (``SPGD(...)``, ``EmbeddingPGD(...)``).
        weight: ``lambda``, the weight of the adversarial loss (0 skips the attack).
        mode: ``"embedding"`` (the continuous perturbation, as in the paper) or ``"tokens"``.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        perturbation_mode: the mode the embedding perturbation's gradients are taken in: ``"train"`` (dropout
            on, as Miyato et al. and Sato et al. do) or ``"attack"`` (the attack's own ``model_mode``).

    Example:
        >>> TextClassifier(net, objectives=[CrossEntropy(), TextAdversarialTraining(SPGD(max_words=5, steps=1))])
    """

    accuracy_names = ("adv_acc",)

    def __init__(self, attack: TextAttack, weight: float = 1.0, mode: str = "embedding",
                 label_smoothing: float = 0.0, perturbation_mode: str = "train") -> None:
        if not isinstance(attack, TextAttack):
            raise TypeError(f"attack must be a TextAttack (SPGD, AdvTText, IAdvTText, EmbeddingPGD), "
                            f"got {type(attack).__name__}")
        self.attack = attack
        self.weight = float(check_non_negative("adversarial_weight", weight))
        self.mode = check_choice("adversarial_mode", mode, TEXT_ADVERSARIAL_MODES)
        self.label_smoothing = float(check_fraction("label_smoothing", label_smoothing))
        self.perturbation_mode = check_choice("perturbation_mode", perturbation_mode, PERTURBATION_MODES)

    def setup(self, module: nn.Module, num_classes: int) -> None:
        if not callable(getattr(module, "get_input_embeddings", None)):
            raise TypeError(f"{type(module).__name__} must expose get_input_embeddings() to be attacked")

    def __call__(self, module: nn.Module, batch: TrainingBatch) -> ObjectiveOutput:
        ids, y = batch.x, batch.y
        mask = batch.forward_kwargs.get("attention_mask")
        if self.weight == 0:
            return torch.zeros((), device=y.device), {}
        model: Any = module
        if self.mode == "embedding":
            r = self.attack.embedding_perturbation(
                model, ids, y, mask, model_mode="train" if self.perturbation_mode == "train" else None)
            embeds = model.get_input_embeddings()(ids) + r
            adv_logits = model(inputs_embeds=embeds, attention_mask=mask)
            words = (r.norm(dim=-1) > 0).sum(1).float().mean()
        else:
            res = self.attack(model, ids, y, mask)
            adv_logits = model(res.input_ids, mask)
            words = res.num_changed.float().mean()
        adv = F.cross_entropy(adv_logits, y, label_smoothing=self.label_smoothing)
        clean = F.cross_entropy(batch.input_logits(module), y, label_smoothing=self.label_smoothing)
        batch.accuracies["adv_acc"] = (adv_logits.detach(), y)
        logs = {"clean_loss": clean.detach(), "adv_loss": adv.detach(), "words_perturbed": words}
        return self.weight * adv, logs
