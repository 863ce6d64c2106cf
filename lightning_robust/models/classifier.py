"""A LightningModule around any classification net: cross-entropy training with torchmetrics accuracy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_robust.attacks import Attack
from lightning_robust.attacks import adversarial_training as adv
from lightning_robust.certify import certify, simplex_hinge_loss
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.checkpoint import WeightsOnlyLoadFromCheckpoint
from lightning_robust.utils.validation import (
    check_choice,
    check_fraction,
    check_non_negative,
    check_positive,
    check_positive_int,
)

__all__ = ["Classifier", "default_optimizer"]


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """Adam with lr 1e-3: a safe default for the small CPU-scale runs (papers' configs set SGD)."""
    return torch.optim.Adam(params, lr=1e-3)


def _num_classes_of(net: nn.Module) -> int | None:
    n = getattr(net, "num_classes", None)
    return int(n) if isinstance(n, int) else None


class Classifier(WeightsOnlyLoadFromCheckpoint, pl.LightningModule):  # type: ignore[misc]  # weights-only override
    """Standard supervised training of ``net`` (logits out) with cross-entropy.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``
    (epoch-level metrics synchronised across processes by torchmetrics). Optimizer and scheduler are
    callables in the LightningCLI style, so YAML selects them with ``class_path``.

    Subclasses and mixins extend :meth:`training_loss`, which returns the loss, the logits whose accuracy
    is reported, and a dict of extra values to log.

    Args:
        net: any ``nn.Module`` mapping inputs to logits (images in [0, 1]).
        num_classes: number of classes; read from ``net.num_classes`` when omitted.
        optimizer: ``params -> Optimizer`` (default Adam, lr 1e-3).
        scheduler: optional ``optimizer -> LRScheduler``.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        scheduler_monitor: metric monitored by ``ReduceLROnPlateau``-style schedulers.
        label_smoothing: cross-entropy label smoothing in [0, 1).
        certificate_weight: weight of the certified-robust training term (0 disables it). Singla & Feizi
            (arXiv 1902.01235): the simplex certificate is closed-form and differentiable, so training can
            enlarge it; ``"simplex"`` uses :func:`~lightning_robust.certify.simplex_hinge_loss` (hinges on
            the ``certificate_topk`` nearest facets of the certified polyhedron and on the signed distance
            to the linearized boundary of the true class), ``"lipschitz"`` the hinge
            ``relu(1 - r / certificate_radius)`` on the global-Lipschitz certificate ``r``.
        certificate_method: ``"simplex"`` (needs a piecewise-linear net; costs one forward pass per input
            dimension) or ``"lipschitz"`` (cheap).
        certificate_radius: target radius of the hinge (pixel-space L2 units).
        certificate_topk: nearest neuron facets in the simplex hinge.
        attack: train on adversarial examples of this attack (Madry et al., arXiv 1706.06083), e.g.
            ``PGD(eps=8/255, alpha=2/255, steps=7)``; ``None`` trains on clean inputs.
        adversarial_mode: ``"pgd"`` (run ``attack`` as given), ``"fast"`` (FGSM with random start and step
            ``fast_alpha`` on ``attack``'s threat model, Wong et al., arXiv 2001.03994) or ``"free"``
            (``free_replays`` replays of each minibatch with a carried perturbation, Shafahi et al.,
            arXiv 1904.12843; uses manual optimization, and the perturbation is saved in checkpoints).
        free_replays: minibatch replays ``m`` of free training (run ``1/m`` of the epochs).
        fast_alpha: FGSM step of fast training (default ``1.25 eps``).
        tripwire_batches: hold this many training batches and log ``train/tripwire_acc``, the accuracy
            under ``tripwire_attack`` after every epoch (0 = off): the sign of catastrophic overfitting.
        tripwire_attack: the trip-wire's attack (default PGD-10, step ``eps/4``, on ``attack``'s threat).
        tripwire_max_drop: stop training when the trip-wire accuracy falls more than this below its best.

    Raises:
        ValueError: if ``num_classes`` is missing and the net does not expose it, or an argument is invalid.

    Example:
        >>> model = Classifier(SmallCNN(input_size=8))
        >>> pl.Trainer(max_epochs=3).fit(model, datamodule=DigitsDataModule())
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        label_smoothing: float = 0.0,
        certificate_weight: float = 0.0,
        certificate_method: str = "simplex",
        certificate_radius: float = 0.5,
        certificate_topk: int = 8,
        attack: Attack | None = None,
        adversarial_mode: str = "pgd",
        free_replays: int = 4,
        fast_alpha: float | None = None,
        tripwire_batches: int = 0,
        tripwire_attack: Attack | None = None,
        tripwire_max_drop: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        num_classes = num_classes if num_classes is not None else _num_classes_of(net)
        if num_classes is None:
            raise ValueError("num_classes must be given (the net has no `num_classes` attribute)")
        check_positive_int("num_classes", num_classes, minimum=2)
        check_choice("scheduler_interval", scheduler_interval, ("epoch", "step"))
        check_fraction("label_smoothing", label_smoothing)
        check_non_negative("certificate_weight", certificate_weight)
        check_choice("certificate_method", certificate_method, ("simplex", "lipschitz"))
        check_positive("certificate_radius", certificate_radius)
        check_positive_int("certificate_topk", certificate_topk)
        self._init_adversarial(attack, adversarial_mode, free_replays, fast_alpha, tripwire_batches, tripwire_attack,
                               tripwire_max_drop)
        # Only primitives go into hparams: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler", "attack", "tripwire_attack"])
        self.hparams["num_classes"] = num_classes
        self.net = net
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.certificate_weight = certificate_weight
        self.certificate_method = certificate_method
        self.certificate_radius = certificate_radius
        self.certificate_topk = certificate_topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Return ``(loss, logits for accuracy, extra logs)`` for a training batch."""
        if self.train_attack is not None:
            x = self.train_attack(self, x, y)
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        extra: dict[str, Any] = {}
        if self.certificate_weight > 0:
            loss = loss + self.certificate_weight * self.certificate_loss(x, y, extra)
        return loss, logits, extra

    def certificate_loss(self, x: torch.Tensor, y: torch.Tensor, extra: dict[str, Any]) -> torch.Tensor:
        """The certified-robust training term for a batch (see ``certificate_weight``); logs into ``extra``."""
        if self.certificate_method == "simplex":
            term, radius = simplex_hinge_loss(self.net, x, y, self.certificate_radius, topk=self.certificate_topk)
        else:
            radius = certify(self.net, x, y, self.certificate_method, signed=True)
            term = F.relu(1 - radius / self.certificate_radius).mean()
        extra["certificate"] = radius.detach().clamp_min(0).mean()
        extra["certificate_loss"] = term.detach()
        return term

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = split_batch(batch)
        self._hold_tripwire_batch(x, y)
        if self.adversarial_mode == "free" and self.attack is not None:
            loss, logits, extra = self._free_training_step(x, y)
        else:
            loss, logits, extra = self.training_loss(x, y)
        self.train_acc(logits.detach(), y)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        for name, value in extra.items():
            self.log(f"train/{name}", value, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _eval_step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y, _ = split_batch(batch)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        metric = self.val_acc if stage == "val" else self.test_acc
        metric(logits, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", on_epoch=True, sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val", on_epoch=True)
        return logits

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = split_batch(batch).x if isinstance(batch, (list, tuple, dict)) else batch
        return self(x)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": self.scheduler_interval,
                "monitor": self.scheduler_monitor,
            },
        }

    # ---- adversarial training (maths in attacks/adversarial_training.py) -----------------------------
    def _init_adversarial(self, attack: Attack | None, mode: str, free_replays: int, fast_alpha: float | None,
                          tripwire_batches: int, tripwire_attack: Attack | None,
                          tripwire_max_drop: float | None) -> None:
        for name, value in (("attack", attack), ("tripwire_attack", tripwire_attack)):
            if value is not None and not isinstance(value, Attack):
                raise TypeError(f"{name} must be an Attack, got {type(value).__name__}")
        self.adversarial_mode = check_choice("adversarial_mode", mode, adv.ADVERSARIAL_MODES)
        self.free_replays = check_positive_int("free_replays", free_replays)
        self.tripwire_batches = check_positive_int("tripwire_batches", tripwire_batches, minimum=0)
        if tripwire_max_drop is not None:
            check_non_negative("tripwire_max_drop", tripwire_max_drop)
        self.tripwire_max_drop = tripwire_max_drop
        self.attack = attack
        # The attack the training inputs go through: the given one, its fast variant, or none (free
        # training perturbs inside its own step; clean training not at all).
        self.train_attack: Attack | None = None
        if attack is not None and mode == "pgd":
            self.train_attack = attack
        elif attack is not None and mode == "fast":
            self.train_attack = adv.fast_attack(attack, fast_alpha)
        elif attack is not None and mode == "free":
            adv.free_delta_update(torch.zeros(1, 1), torch.zeros(1, 1), attack)  # checks the threat model
            self.automatic_optimization = False
        if tripwire_batches and tripwire_attack is None:
            if attack is None:
                raise ValueError("tripwire_attack must be given when tripwire_batches > 0 and attack is None")
            tripwire_attack = adv.default_tripwire_attack(attack)
        self.tripwire_attack = tripwire_attack
        self._free_delta: torch.Tensor | None = None
        self._tripwire_held: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tripwire_history: list[float] = []

    def _free_training_step(self, x: torch.Tensor,
                            y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Free adversarial training: ``free_replays`` optimizer steps on this minibatch, one backward each."""
        return self._free_replays(x, lambda x_adv: self.training_loss(x_adv, y))

    def _free_replays(self, x: torch.Tensor, loss_of: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor,
                      dict[str, Any]]]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The free-training loop (Shafahi et al., arXiv 1904.12843) around ``loss_of(x_adv)``.

        The minibatch is replayed ``free_replays`` times; each backward gives the weights' gradient and the
        input gradient that updates the perturbation ``δ``, which is carried to the next minibatch (and kept
        in checkpoints). Subclasses supply their own loss (ARD: the distillation loss).
        """
        assert self.attack is not None
        threat = self.attack.threat
        optimizer = self.optimizers()
        n = x.shape[0]
        if self._free_delta is None or self._free_delta.shape[1:] != x.shape[1:] or self._free_delta.shape[0] < n:
            self._free_delta = torch.zeros_like(x)
        self._free_delta = self._free_delta.to(x.device)
        delta = self._free_delta[:n]
        for _ in range(self.free_replays):
            x_adv = (x + delta).clamp(threat.low, threat.high).detach().requires_grad_(True)
            loss, logits, extra = loss_of(x_adv)
            optimizer.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(loss)
            optimizer.step()  # type: ignore[union-attr]
            assert x_adv.grad is not None
            delta = adv.free_delta_update(delta, x_adv.grad, self.attack).detach()
            if self.scheduler_factory is not None and self.scheduler_interval == "step":
                self._step_schedulers()
        self._free_delta[:n] = delta
        return loss, logits, extra

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        for sch in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau):
                value = self.trainer.callback_metrics.get(self.scheduler_monitor)
                if value is not None:
                    sch.step(value)  # type: ignore[arg-type]
            elif sch is not None:
                sch.step()  # type: ignore[call-arg]

    def _hold_tripwire_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(self._tripwire_held) < self.tripwire_batches:
            self._tripwire_held.append((x.detach().clone(), y.detach().clone()))

    def on_train_epoch_end(self) -> None:
        manual = not self.automatic_optimization
        if manual and self.scheduler_factory is not None and self.scheduler_interval == "epoch":
            self._step_schedulers()
        if self.tripwire_attack is None or not self._tripwire_held:
            return
        correct, total = adv.robust_correct(self, self.tripwire_attack, self._tripwire_held)
        counts = torch.tensor([correct, total], dtype=torch.float64, device=self.device)
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        acc = float(counts[0] / counts[1])
        self.tripwire_history.append(acc)
        self.log("train/tripwire_acc", acc, on_epoch=True, sync_dist=False)
        if adv.tripwire_tripped(self.tripwire_history, self.tripwire_max_drop):
            from pytorch_lightning.utilities import rank_zero_warn

            rank_zero_warn(f"trip-wire: accuracy under {type(self.tripwire_attack).__name__} fell to {acc:.3f} "
                           f"from a best of {max(self.tripwire_history[:-1]):.3f} (catastrophic overfitting?); "
                           "stopping training")
            self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state: dict[str, Any] = {"tripwire_history": list(self.tripwire_history)}
        if self._free_delta is not None:
            delta = self._free_delta
            # Every rank carries its own perturbation; keep them all so each rank resumes with its own.
            if self._trainer is not None and self.trainer.world_size > 1:
                delta = self.trainer.strategy.all_gather(delta)
            else:
                delta = delta.unsqueeze(0)
            state["free_delta"] = delta.detach().cpu()
        checkpoint["adversarial_training"] = state

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("adversarial_training", {})
        self.tripwire_history = [float(v) for v in state.get("tripwire_history", [])]
        delta = state.get("free_delta")
        if delta is not None:
            rank = self.trainer.global_rank if self._trainer is not None else 0
            self._free_delta = delta[min(rank, delta.shape[0] - 1)].to(self.device)
