"""Stop training on a NaN or infinite loss, naming the module, the step and the value.

A single NaN in a loss propagates into every weight at the next optimizer step, and training then goes
on "successfully" on garbage: accuracy collapses to chance, GAN samples turn black, and the run's last
checkpoint is worthless. :class:`FiniteLossGuard` checks the loss returned by ``training_step`` and every
logged training metric whose name contains ``loss`` (manual-optimization modules such as GANs return
nothing but log their losses), optionally the gradients before each optimizer step, and raises
:class:`NonFiniteLossError` at the first non-finite value. The loss is checked in ``on_before_backward``,
which Lightning calls for automatic optimization and for ``manual_backward`` alike, so the error is raised
before the bad loss is back-propagated: the weights still hold their last finite values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch.optim import Optimizer

from lightning_robust.utils.validation import check_positive_int

__all__ = ["FiniteLossGuard", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """A loss or gradient became NaN or infinite during training."""


def _where(trainer: pl.Trainer, module: pl.LightningModule) -> str:
    return (
        f"{type(module).__name__} at global step {trainer.global_step} "
        f"(epoch {trainer.current_epoch}, rank {trainer.global_rank})"
    )


class FiniteLossGuard(pl.Callback):
    """Raise :class:`NonFiniteLossError` as soon as a training loss (or gradient) is NaN or infinite.

    Args:
        every_n_steps: check every n-th training batch (1 = every batch; each check reads a scalar from
            the device, which synchronises a GPU stream).
        check_gradients: also check every parameter gradient before each optimizer step (automatic
            optimization only; costs one reduction per parameter).
        metric_substring: logged metrics whose name contains this are checked too.

    Raises:
        ValueError: ``every_n_steps`` is not a positive integer.

    Example:
        >>> trainer = pl.Trainer(callbacks=[FiniteLossGuard()])
    """

    def __init__(self, every_n_steps: int = 1, check_gradients: bool = False, metric_substring: str = "loss") -> None:
        super().__init__()
        self.every_n_steps = check_positive_int("every_n_steps", every_n_steps)
        self.check_gradients = bool(check_gradients)
        if not isinstance(metric_substring, str):
            raise ValueError(f"metric_substring must be a string, got {metric_substring!r}")
        self.metric_substring = metric_substring

    def _due(self, trainer: pl.Trainer) -> bool:
        return trainer.fit_loop.epoch_loop.batch_progress.current.ready % self.every_n_steps == 0

    @staticmethod
    def _raise(trainer: pl.Trainer, pl_module: pl.LightningModule, bad: Mapping[str, float]) -> None:
        raise NonFiniteLossError(
            f"non-finite loss in {_where(trainer, pl_module)}: "
            + ", ".join(f"{k} = {v}" for k, v in sorted(bad.items()))
            + ". Training stopped before this loss reached the weights; lower the learning rate, check the "
            "inputs for NaN, or enable gradient clipping."
        )

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._due(trainer) and torch.is_tensor(loss) and not bool(torch.isfinite(loss.detach()).all()):
            self._raise(trainer, pl_module, {"loss passed to backward": float(loss.detach().flatten()[0])})

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._due(trainer):
            return
        found: dict[str, float] = {}
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if torch.is_tensor(loss) and loss.numel() == 1:
            found["training_step loss"] = float(loss.detach())
        for name, value in trainer.callback_metrics.items():
            if name.startswith(("val", "test", "predict")):
                continue  # evaluation metrics from an earlier loop are not this step's training loss
            if self.metric_substring in name and torch.is_tensor(value) and value.numel() == 1:
                found[name] = float(value.detach())
        bad = {k: v for k, v in found.items() if not math.isfinite(v)}
        if bad:
            self._raise(trainer, pl_module, bad)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if not self.check_gradients:
            return
        for name, param in pl_module.named_parameters():
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                raise NonFiniteLossError(
                    f"non-finite gradient of parameter {name!r} in {_where(trainer, pl_module)}; the optimizer "
                    "step was not taken."
                )
