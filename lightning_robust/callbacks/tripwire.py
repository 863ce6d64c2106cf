"""Catastrophic-overfitting trip-wire for adversarial training (Wong, Rice & Kolter 2020, arXiv 2001.03994).

Fast (FGSM) adversarial training can suddenly lose all robustness to PGD within an epoch ("catastrophic
overfitting", Section 5). The trip-wire holds a few training batches and, after every training epoch,
measures the accuracy under a stronger attack on them (``train/tripwire_acc``); when it falls more than
``max_drop`` below its best, training stops.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from lightning_robust.attacks import adversarial_training as adv
from lightning_robust.attacks.base import Attack
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.modules import resolve_layer
from lightning_robust.utils.validation import check_non_negative, check_positive_int

__all__ = ["TripWire"]


class TripWire(pl.Callback):
    """Log the accuracy under ``attack`` on held training batches after each epoch; stop on a collapse.

    The first ``batches`` training batches of the run (their clean inputs) are held. After every training
    epoch the accuracy of the module (or of its submodule ``net``) under ``attack`` on them is summed over
    all processes and logged as ``train/tripwire_acc``; with ``max_drop`` set, training stops (on every rank
    alike) once it is more than ``max_drop`` below the best value so far, with a warning. The history is
    kept in this callback's checkpoint state.

    Args:
        batches: number of training batches to hold (>= 1).
        attack: the trip-wire's attack; ``None`` derives PGD-10 with step ``eps/4`` and a random start from
            the module's training attack (its ``attack`` attribute; L-inf or L2).
        max_drop: stop training when the accuracy falls more than this below its best (``None``: never).
        net: dotted path of the submodule to attack (``""`` = the module itself).

    Raises:
        ValueError: on a bad number, or (at the start of fit) no ``attack`` and no training attack on the module.

    Example:
        >>> trainer = pl.Trainer(callbacks=[TripWire(batches=2, max_drop=0.2)])
        >>> trainer.fit(Classifier(net, objectives=[AdversarialTraining(PGD(eps=8/255), mode="fast")]), dm)
    """

    def __init__(self, batches: int = 2, attack: Attack | None = None, max_drop: float | None = None,
                 net: str = "") -> None:
        super().__init__()
        self.batches = check_positive_int("tripwire_batches", batches)
        if attack is not None and not isinstance(attack, Attack):
            raise TypeError(f"tripwire_attack must be an Attack, got {type(attack).__name__}")
        if max_drop is not None:
            check_non_negative("tripwire_max_drop", max_drop)
        if not isinstance(net, str):
            raise TypeError(f"net must be a dotted submodule name (str), got {type(net).__name__}")
        self.attack = attack
        self.max_drop = max_drop
        self.net = net
        self.history: list[float] = []
        self._held: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(batches=self.batches, max_drop=self.max_drop, net=self.net)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not in `setup`: Lightning runs the callbacks' setup before the module's own setup/configure_model,
        # where a module may build its network lazily. on_fit_start is still before the first step.
        if self.net:
            resolve_layer(pl_module, self.net)  # a clear error naming the valid submodules
        if self.attack is None:
            train_attack = getattr(pl_module, "attack", None)
            if not isinstance(train_attack, Attack):
                raise ValueError("TripWire(attack=None) derives its attack from the module's training attack, but "
                                 f"{type(pl_module).__name__} has none: pass attack=PGD(...)")
            self.attack = adv.default_tripwire_attack(train_attack)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if len(self._held) < self.batches:
            x, y, _ = split_batch(batch)
            self._held.append((x.detach().clone(), y.detach().clone()))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.attack is None or not self._held:
            return
        model = resolve_layer(pl_module, self.net) if self.net else pl_module
        correct, total = adv.robust_correct(model, self.attack, self._held)
        counts = torch.tensor([correct, total], dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        acc = float(counts[0] / counts[1])
        self.history.append(acc)
        # already summed over the processes: every rank logs the same value
        pl_module.log("train/tripwire_acc", acc, on_epoch=True, sync_dist=False)
        if adv.tripwire_tripped(self.history, self.max_drop):
            rank_zero_warn(f"trip-wire: accuracy under {type(self.attack).__name__} fell to {acc:.3f} from a best "
                           f"of {max(self.history[:-1]):.3f} (catastrophic overfitting?); stopping training")
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"tripwire_history": list(self.history)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.history = [float(v) for v in state_dict.get("tripwire_history", [])]
