"""The shared shell of the evaluation callbacks: one schedule, one vocabulary, one evaluated subset.

Every evaluation callback (:class:`~lightning_robust.callbacks.RobustnessEvaluation`,
:class:`~lightning_robust.callbacks.CertificationCallback`, :class:`~lightning_robust.callbacks.SaliencyCertification`,
:class:`~lightning_robust.callbacks.GANEvaluation`, :class:`~lightning_robust.callbacks.LikelihoodHistogram`,
:class:`~lightning_robust.callbacks.SampleGrid`) derives from :class:`EvaluationCallback`, so they share

* ``every_n_epochs``: during ``trainer.fit`` the callback evaluates after epochs ``n-1, 2n-1, 3n-1, ...``
  (0-based ``current_epoch``; i.e. after every n-th completed epoch), never during the sanity check, and
  never during fit when ``every_n_epochs == 0``. ``trainer.validate`` and ``trainer.test`` always evaluate.
* ``prefix``: the first component of every logged name;
* ``net``: dotted path of the submodule to use (``""``/``None``: the LightningModule itself);
* ``num_samples``: how many inputs are evaluated (over all processes); ``n_samples`` where there are noise
  draws;
* ``prog_bar``: also show the logged numbers in the progress bar;
* errors: ``TypeError`` for an argument of the wrong type, ``ValueError`` for a bad value, raised in the
  constructor or when the run starts (before the first training step), never later. The checks that read the
  module run in ``on_fit_start`` / ``on_validation_start`` / ``on_test_start``, not in ``setup``: Lightning
  calls the callbacks' ``setup`` *before* the module's own ``setup`` and ``configure_model`` (where a module
  may build its network lazily) and before the strategy moves the module to its device.

Metrics go through ``pl_module.log`` with ``sync_dist=True`` and a ``batch_size``, so they appear in the
dicts ``trainer.validate`` / ``trainer.test`` return, in the CLI's ``test`` table, and can be monitored by
``ModelCheckpoint`` and ``EarlyStopping``.

The evaluated subset is shared: per stage, the first evaluation callback of the Trainer (in callback order)
collects the first inputs of each process's first evaluation dataloader (unshuffled in validation and
test, so the same inputs every epoch), as many as the largest ``num_samples`` of the Trainer's evaluation
callbacks, and every callback evaluates a prefix of that one sequence. Two callbacks with the same
``num_samples`` therefore evaluate exactly the same inputs, so "clean accuracy" is one number.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn

from lightning_robust.utils.batch import split_batch

__all__ = ["EvaluationCallback", "renamed_argument"]

T = TypeVar("T")

def renamed_argument(owner: str, old: str, old_value: T | None, new: str, new_value: T, default: T) -> T:
    """Resolve a deprecated keyword: ``old_value`` wins (with a ``DeprecationWarning``) if given.

    Raises:
        ValueError: when both the old and the new name are given (different from the default).
    """
    if old_value is None:
        return new_value
    if new_value != default:
        raise ValueError(f"{owner}: give {new}= only ({old}= is its deprecated old name), got both")
    warnings.warn(f"{owner}({old}=...) is deprecated and will be removed in the next release; use {new}= instead",
                  DeprecationWarning, stacklevel=3)
    return old_value


class _Subset:
    """The inputs one stage evaluates on one process: the first ``quota`` samples of dataloader 0."""

    def __init__(self) -> None:
        self.xs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.count = 0
        self.quota = 0

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.xs:
            return None
        return torch.cat(self.xs), torch.cat(self.ys)


# One subset per (Trainer, stage); weak keys so that a finished Trainer frees its inputs.
_SUBSETS: weakref.WeakKeyDictionary[pl.Trainer, dict[str, _Subset]] = weakref.WeakKeyDictionary()


def _callbacks(trainer: pl.Trainer) -> list[pl.Callback]:
    # Trainer.callbacks is set by its callback connector (not declared on the class).
    return list(getattr(trainer, "callbacks", []))


class EvaluationCallback(pl.Callback):
    """Base of the evaluation callbacks (see the module docstring for the shared contract).

    Subclasses implement :meth:`evaluate` (given the shared subset) or override the ``_eval_*`` hooks, and
    may extend :meth:`check_setup` with their own fail-fast checks.

    Args:
        every_n_epochs: during fit, evaluate after epochs ``n-1, 2n-1, ...``; 0: never during fit.
        prefix: first component of the logged names.
        net: dotted path of the submodule to evaluate (``""``/``None``: the LightningModule).
        num_samples: inputs to evaluate over all processes (``None``: the callback does not use the subset).
        prog_bar: show the logged numbers in the progress bar.
    """

    #: Whether the callback reads the shared evaluated subset (classifier evaluations do).
    uses_subset = True
    #: Where it evaluates during fit: ``"validation"`` (end of a validation epoch) or ``"train"`` (end of a
    #: training epoch, for generators that need no validation loop); validate/test use their own loops.
    fit_hook = "validation"

    def __init__(self, *, every_n_epochs: int = 1, prefix: str = "eval", net: str | None = None,
                 num_samples: int | None = 256, prog_bar: bool = False) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(every_n_epochs, int) or isinstance(every_n_epochs, bool):
            raise TypeError(f"{name}: every_n_epochs must be an int, got {type(every_n_epochs).__name__}")
        if every_n_epochs < 0:
            raise ValueError(f"{name}: every_n_epochs must be >= 0 (0: never during fit), got {every_n_epochs}")
        if not isinstance(prefix, str):
            raise TypeError(f"{name}: prefix must be a string, got {type(prefix).__name__}")
        if not prefix or prefix.startswith("/") or prefix.endswith("/"):
            raise ValueError(f"{name}: prefix must be a non-empty name without leading/trailing '/', got {prefix!r}")
        if net is not None and not isinstance(net, str):
            raise TypeError(f"{name}: net must be a dotted submodule path (str) or None, got {type(net).__name__}")
        if num_samples is not None:
            if not isinstance(num_samples, int) or isinstance(num_samples, bool):
                raise TypeError(f"{name}: num_samples must be an int, got {type(num_samples).__name__}")
            if num_samples < 1:
                raise ValueError(f"{name}: num_samples must be a positive integer, got {num_samples}")
        if not isinstance(prog_bar, bool):
            raise TypeError(f"{name}: prog_bar must be a bool, got {type(prog_bar).__name__}")
        self.every_n_epochs = every_n_epochs
        self.prefix = prefix
        self.net = net or None
        self.num_samples = num_samples
        self.prog_bar = prog_bar
        self._running: dict[str, bool] = {}
        self._pending_check: str | None = None

    # ---- schedule --------------------------------------------------------------------------------------
    def is_due(self, trainer: pl.Trainer) -> bool:
        """Whether the callback evaluates now (see ``every_n_epochs`` in the module docstring)."""
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:
            return True
        return self.every_n_epochs > 0 and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    # ---- the sub-network -------------------------------------------------------------------------------
    def resolve_net(self, pl_module: pl.LightningModule) -> nn.Module:
        """The submodule named by ``net`` (the module itself when ``net`` is empty)."""
        if self.net is None:
            return pl_module
        try:
            sub = pl_module.get_submodule(self.net)
        except AttributeError:
            children = sorted(n for n, _ in pl_module.named_children())
            raise ValueError(f"{type(self).__name__}: net={self.net!r} is not a submodule of "
                             f"{type(pl_module).__name__} (its submodules: {children}); give the dotted path of "
                             "the network to evaluate, or net=None for the module itself") from None
        return sub

    # ---- fail fast ------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Only remember the stage: the module's own setup/configure_model has not run yet (a lazily built
        # `net` does not exist) and the module is not on its device yet. The check runs at the stage's start.
        self._pending_check = stage

    def _run_pending_check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._pending_check
        if stage is not None:
            self._pending_check = None
            self.check_setup(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_pending_check(trainer, pl_module)  # before the sanity check and the first step

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_pending_check(trainer, pl_module)  # trainer.validate (during fit: done in on_fit_start)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_pending_check(trainer, pl_module)

    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Validate the settings against the module and data before the first step (override to extend).

        Runs once per ``fit`` / ``validate`` / ``test``, after the module's ``setup`` and ``configure_model``
        and after the module is on its device (``stage`` is the ``setup`` stage: ``"fit"``, ``"validate"``
        or ``"test"``).
        """
        self.resolve_net(pl_module)

    @staticmethod
    def peek_batch(trainer: pl.Trainer, stage: str) -> Any | None:
        """The first batch of the stage's first evaluation dataloader of the datamodule (``None`` if unknown).

        Used by :meth:`check_setup`; the datamodule is set up by then.
        """
        dm = getattr(trainer, "datamodule", None)
        fn = getattr(dm, "test_dataloader" if stage == "test" else "val_dataloader", None)
        if dm is None or not callable(fn):
            return None
        try:
            loader = fn()
        except NotImplementedError:
            return None
        if isinstance(loader, (list, tuple)):
            loader = loader[0] if loader else None
        if isinstance(loader, dict):
            loader = next(iter(loader.values()), None)
        if loader is None:
            return None
        return next(iter(loader), None)

    # ---- the shared subset ----------------------------------------------------------------------------
    def _quota(self, trainer: pl.Trainer) -> int:
        assert self.num_samples is not None
        return math.ceil(self.num_samples / max(1, trainer.world_size))

    def _is_collector(self, trainer: pl.Trainer) -> bool:
        first = next((cb for cb in _callbacks(trainer) if isinstance(cb, EvaluationCallback) and cb.uses_subset
                      and cb.num_samples is not None), None)
        return first is self

    def subset(self, trainer: pl.Trainer, stage: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This process's share of the evaluated subset, cut to this callback's ``num_samples``."""
        held = _SUBSETS.get(trainer, {}).get(stage)
        got = held.tensors() if held is not None else None
        if got is None:
            return None
        quota = self._quota(trainer)
        return got[0][:quota], got[1][:quota]

    def _start_subset(self, trainer: pl.Trainer, stage: str) -> None:
        quota = max(cb._quota(trainer) for cb in _callbacks(trainer)
                    if isinstance(cb, EvaluationCallback) and cb.uses_subset and cb.num_samples is not None)
        held = _SUBSETS.setdefault(trainer, {}).setdefault(stage, _Subset())
        held.xs, held.ys, held.count, held.quota = [], [], 0, quota

    def _collect(self, trainer: pl.Trainer, stage: str, batch: Any) -> None:
        held = _SUBSETS.get(trainer, {}).get(stage)
        if held is None or held.count >= held.quota:
            return
        x, y, _ = split_batch(batch)
        need = held.quota - held.count
        # Normal (not inference-mode) copies: the attacks and certificates need autograd on them.
        with torch.inference_mode(False):
            held.xs.append(x[:need].detach().clone())
            held.ys.append(y[:need].detach().clone())
        held.count += min(need, len(x))

    # ---- Lightning hooks (validation during fit, trainer.validate, trainer.test) ----------------------
    def _epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        self._running[stage] = self.is_due(trainer) and not (fitting and self.fit_hook == "train")
        if self.uses_subset and self.num_samples is not None and self._is_collector(trainer):
            # The collector gathers even when it is not due itself: another callback may be.
            if any(isinstance(cb, EvaluationCallback) and cb.uses_subset and cb.is_due(trainer)
                   for cb in _callbacks(trainer)):
                self._start_subset(trainer, stage)
            else:
                _SUBSETS.get(trainer, {}).pop(stage, None)
        if self._running[stage]:
            self.on_eval_epoch_start(trainer, pl_module, stage)

    def _batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                   batch_idx: int, dataloader_idx: int, stage: str) -> None:
        if dataloader_idx != 0:
            return
        if self.uses_subset and self.num_samples is not None and self._is_collector(trainer):
            self._collect(trainer, stage, batch)
        if self._running.get(stage):
            self.on_eval_batch_end(trainer, pl_module, outputs, batch, batch_idx, stage)

    def _epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._running.pop(stage, False):
            return
        if self.uses_subset and self.num_samples is not None:
            data = self.subset(trainer, stage)
            self.evaluate(trainer, pl_module, data, stage)
        else:
            self.evaluate(trainer, pl_module, None, stage)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fit_hook == "train" and self.is_due(trainer):
            self.evaluate(trainer, pl_module, None, "fit")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start(trainer, pl_module, "validate")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, "validate")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start(trainer, pl_module, "test")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx, "test")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_end(trainer, pl_module, "test")

    # ---- what subclasses implement --------------------------------------------------------------------
    def on_eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Called at the start of a due evaluation epoch (``stage``: ``"validate"`` or ``"test"``)."""

    def on_eval_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, stage: str) -> None:
        """Called after each batch of dataloader 0 of a due evaluation epoch."""

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 data: tuple[torch.Tensor, torch.Tensor] | None, stage: str) -> None:
        """Evaluate at the end of a due epoch; ``data`` is this process's share of the subset (or ``None``).

        ``stage`` is ``"validate"`` (validation during fit and ``trainer.validate``), ``"test"``, or
        ``"fit"`` (end of a training epoch, for ``fit_hook = "train"``).
        """

    # ---- logging ---------------------------------------------------------------------------------------
    def log_metrics(self, pl_module: pl.LightningModule, values: dict[str, float], batch_size: int) -> None:
        """Log ``{prefix}/{key}`` for each value through Lightning (epoch-level, DDP-synced, monitorable).

        The values are already reduced over processes (identical on every rank), so ``sync_dist``'s mean
        leaves them unchanged; it is set so that Lightning does not warn under DDP.
        """
        for key, value in values.items():
            pl_module.log(f"{self.prefix}/{key}", float(value), on_step=False, on_epoch=True, sync_dist=True,
                          batch_size=max(1, int(batch_size)), prog_bar=self.prog_bar)
