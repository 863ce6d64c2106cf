"""A LightningModule around any classification net: cross-entropy training with torchmetrics accuracy."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_robust.certify import certify, simplex_hinge_loss
from lightning_robust.utils.batch import split_batch
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


class Classifier(pl.LightningModule):
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
        # Only primitives go into hparams: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"])
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
