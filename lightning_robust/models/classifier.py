"""A LightningModule around any classification net, trained on a sum of composable objectives.

The training loss is ``sum_i objective_i(module, batch)`` over :attr:`Classifier.objectives` (clean
cross-entropy by default; adversarial training, a certified-radius term, distillation, saliency consistency,
text adversarial training: :mod:`lightning_robust.objectives`), so a new method adds an objective rather
than a subclass. The 0.1.0 keyword arguments (``attack``, ``adversarial_mode``, ``certificate_weight``,
``tripwire_batches``, ...) remain as a shorthand that builds the same objectives (and the
:class:`~lightning_robust.callbacks.TripWire` callback).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_robust.attacks import Attack
from lightning_robust.attacks import adversarial_training as adv
from lightning_robust.callbacks.tripwire import TripWire
from lightning_robust.objectives import (
    AdversarialTraining,
    CertifiedRadius,
    CrossEntropy,
    Objective,
    TrainingBatch,
)
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.checkpoint import WeightsOnlyLoadFromCheckpoint
from lightning_robust.utils.epoch_means import EpochMeans
from lightning_robust.utils.validation import (
    check_choice,
    check_fraction,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_seed,
)

__all__ = ["Classifier", "default_optimizer"]


def default_optimizer(params: Any) -> torch.optim.Optimizer:
    """Adam with lr 1e-3: a safe default for the small CPU-scale runs (papers' configs set SGD)."""
    return torch.optim.Adam(params, lr=1e-3)


def _num_classes_of(net: nn.Module) -> int | None:
    n = getattr(net, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def _as_objectives(objectives: Objective | Sequence[Objective]) -> list[Objective]:
    items = [objectives] if isinstance(objectives, Objective) else list(objectives)
    if not items:
        raise ValueError("objectives must hold at least one Objective")
    for o in items:
        if not isinstance(o, Objective):
            raise TypeError(f"objectives must be Objective instances, got {type(o).__name__}")
    keys = [o.state_key for o in items if o.state_key is not None]
    if len(keys) != len(set(keys)):
        raise ValueError(f"two objectives keep checkpoint state under the same key: {keys}")
    return items


class Classifier(WeightsOnlyLoadFromCheckpoint, pl.LightningModule):  # type: ignore[misc]  # weights-only override
    """Supervised training of ``net`` (logits out) on a sum of training objectives.

    Logs ``train/loss``, ``train/acc`` (accuracy on the training inputs: the adversarial ones under
    adversarial training), each objective's values as ``train/<name>``, and ``val/loss``, ``val/acc``,
    ``test/loss``, ``test/acc`` (epoch-level metrics synchronised across processes). Optimizer and scheduler
    are callables in the LightningCLI style, so YAML selects them with ``class_path``; so are the objectives::

        model:
          class_path: lightning_robust.models.Classifier
          init_args:
            net: {class_path: lightning_robust.nets.SmallCNN, init_args: {input_size: 8}}
            objectives:
              - class_path: lightning_robust.objectives.AdversarialTraining
                init_args: {attack: {class_path: lightning_robust.attacks.PGD, init_args: {eps: 0.1}}, mode: fast}
              - {class_path: lightning_robust.objectives.CertifiedRadius, init_args: {weight: 0.1}}

    Objectives run in list order on a shared :class:`~lightning_robust.objectives.TrainingBatch`: one that
    replaces the training inputs (adversarial training) does so for the ones after it. When an objective
    replays each minibatch (free adversarial training) the module uses manual optimization.

    Args:
        net: any ``nn.Module`` mapping inputs to logits (images in [0, 1]).
        num_classes: number of classes; read from ``net.num_classes`` when omitted.
        optimizer: ``params -> Optimizer`` (default Adam, lr 1e-3).
        scheduler: optional ``optimizer -> LRScheduler``.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        scheduler_monitor: metric monitored by ``ReduceLROnPlateau``-style schedulers.
        objectives: one :class:`~lightning_robust.objectives.Objective` or a list; ``None`` builds them from
            the shorthand arguments below (clean cross-entropy when none is set). Not saved in the
            hyper-parameters (they hold objects): pass them again to ``load_from_checkpoint``.
        attack_seed: seed of the attacks' random starts (a generator keyed by it, global step and rank, so a
            resumed run draws the same); ``None`` uses the global RNG.
        label_smoothing: shorthand: cross-entropy label smoothing in [0, 1).
        certificate_weight: shorthand: weight of a :class:`~lightning_robust.objectives.CertifiedRadius` term
            (0 disables it), with ``certificate_method``, ``certificate_radius`` and ``certificate_topk``.
        certificate_method: ``"simplex"`` or ``"lipschitz"``.
        certificate_radius: target radius of the hinge (pixel-space L2 units).
        certificate_topk: nearest neuron facets in the simplex hinge.
        attack: shorthand: train with :class:`~lightning_robust.objectives.AdversarialTraining` on this attack
            (Madry et al., arXiv 1706.06083), in ``adversarial_mode`` with ``free_replays`` / ``fast_alpha``.
        adversarial_mode: ``"pgd"``, ``"fast"`` (Wong et al., arXiv 2001.03994) or ``"free"`` (Shafahi et al.,
            arXiv 1904.12843).
        free_replays: minibatch replays ``m`` of free training.
        fast_alpha: FGSM step of fast training (default ``1.25 eps``).
        tripwire_batches: shorthand: > 0 adds a :class:`~lightning_robust.callbacks.TripWire` callback holding
            this many training batches (``train/tripwire_acc`` after every epoch).
        tripwire_attack: the trip-wire's attack (default PGD-10, step ``eps/4``, on ``attack``'s threat).
        tripwire_max_drop: stop training when the trip-wire accuracy falls more than this below its best.

    Raises:
        ValueError: if ``num_classes`` is missing and the net does not expose it, an argument is invalid, or
            ``objectives`` is combined with a shorthand argument.

    Example:
        >>> model = Classifier(SmallCNN(input_size=8))
        >>> model = Classifier(SmallCNN(input_size=8), objectives=[AdversarialTraining(PGD(eps=0.1), mode="fast")])
        >>> pl.Trainer(max_epochs=3).fit(model, datamodule=DigitsDataModule())
    """

    #: constructor arguments that hold objects (never saved as hyper-parameters); subclasses add theirs
    hparams_ignore: ClassVar[tuple[str, ...]] = ("net", "optimizer", "scheduler", "attack", "tripwire_attack",
                                                 "objectives")

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        objectives: Objective | Sequence[Objective] | None = None,
        attack_seed: int | None = None,
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
        if attack_seed is not None:
            check_seed("attack_seed", attack_seed)
        # The shorthand arguments are checked also when objectives are given (their defaults always pass).
        check_fraction("label_smoothing", label_smoothing)
        check_non_negative("certificate_weight", certificate_weight)
        check_choice("certificate_method", certificate_method, ("simplex", "lipschitz"))
        check_positive("certificate_radius", certificate_radius)
        check_positive_int("certificate_topk", certificate_topk)
        check_choice("adversarial_mode", adversarial_mode, adv.ADVERSARIAL_MODES)
        check_positive_int("free_replays", free_replays)
        check_positive_int("tripwire_batches", tripwire_batches, minimum=0)
        for name, value in (("attack", attack), ("tripwire_attack", tripwire_attack)):
            if value is not None and not isinstance(value, Attack):
                raise TypeError(f"{name} must be an Attack, got {type(value).__name__}")
        if objectives is None:
            objectives = self._shorthand_objectives(label_smoothing, certificate_weight, certificate_method,
                                                    certificate_radius, certificate_topk, attack, adversarial_mode,
                                                    free_replays, fast_alpha)
        elif (label_smoothing, certificate_weight, attack) != (0.0, 0.0, None):
            raise ValueError("objectives replaces the shorthand arguments label_smoothing, certificate_weight and "
                             "attack: put CrossEntropy(label_smoothing=...), CertifiedRadius(...) or "
                             "AdversarialTraining(attack) into objectives instead")
        self.objectives: list[Objective] = _as_objectives(objectives)
        self.tripwire: TripWire | None = None
        if tripwire_batches:
            if tripwire_attack is None:
                if self.attack is None:
                    raise ValueError("tripwire_attack must be given when tripwire_batches > 0 and attack is None")
                tripwire_attack = adv.default_tripwire_attack(self.attack)
            self.tripwire = TripWire(tripwire_batches, tripwire_attack, tripwire_max_drop)
        elif tripwire_max_drop is not None:
            check_non_negative("tripwire_max_drop", tripwire_max_drop)
        self.automatic_optimization = max(o.replays for o in self.objectives) == 1
        self._save_primitive_hyperparameters()
        self.hparams["num_classes"] = num_classes
        self.net = net
        self.num_classes = num_classes
        for o in self.objectives:
            o.setup(self, num_classes)
        # not `seed`: a hyper-parameter of that name would clash with the DataModule's when loggers merge them
        self.attack_seed = attack_seed
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.epoch_means = EpochMeans()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        names = [n for o in self.objectives for n in o.accuracy_names]
        # torchmetrics states are not persistent: these add no state-dict keys (old checkpoints load strictly)
        self.objective_accuracies = nn.ModuleDict({n: MulticlassAccuracy(num_classes, average="micro") for n in names})

    def _save_primitive_hyperparameters(self) -> None:
        """Save the constructor arguments of ``type(self)`` that are primitives, once, for every subclass.

        Object arguments (nets, attacks, objectives, optimizer callables) are named in ``hparams_ignore``
        (merged over the class hierarchy): checkpoints must load with ``torch.load(weights_only=True)``.
        Lightning also collects the arguments of the parent constructors a subclass calls; only the names
        the subclass's own constructor takes are kept, so ``load_from_checkpoint`` can pass them back.
        """
        ignore = {n for cls in type(self).__mro__ for n in getattr(cls, "hparams_ignore", ())}
        caller = inspect.currentframe()
        # Lightning reads the constructor arguments from the calling __init__ frame (and its subclasses')
        self.save_hyperparameters(ignore=sorted(ignore), frame=caller.f_back if caller is not None else None)
        accepted = inspect.signature(type(self).__init__).parameters
        for name in list(self.hparams):
            if name not in accepted:
                del self.hparams[name]

    @staticmethod
    def _shorthand_objectives(label_smoothing: float, certificate_weight: float, certificate_method: str,
                              certificate_radius: float, certificate_topk: int, attack: Attack | None,
                              adversarial_mode: str, free_replays: int, fast_alpha: float | None) -> list[Objective]:
        objectives: list[Objective] = []
        if attack is None:
            objectives.append(CrossEntropy(label_smoothing=label_smoothing))
        else:
            objectives.append(AdversarialTraining(attack, adversarial_mode, fast_alpha, free_replays,
                                                  label_smoothing=label_smoothing))
        if certificate_weight > 0:
            objectives.append(CertifiedRadius(certificate_weight, certificate_method, certificate_radius,
                                              certificate_topk))
        return objectives

    # ---- views of the objectives (0.1.0 attribute names) ---------------------------------------------
    def _objective(self, kind: type) -> Any:
        return next((o for o in self.objectives if isinstance(o, kind)), None)

    @property
    def attack(self) -> Any:
        """The training attack: the ``attack`` of the first objective that has one (else ``None``)."""
        attacks = (vars(o).get("attack") for o in self.objectives)
        return next((a for a in attacks if a is not None), None)

    @property
    def train_attack(self) -> Attack | None:
        """The attack the training inputs go through (its fast variant in fast mode; ``None`` for free)."""
        o = self._objective(AdversarialTraining)
        return None if o is None else o.train_attack

    @property
    def adversarial_mode(self) -> str:
        """The ``mode`` of the first objective that has one (adversarial or text adversarial training)."""
        modes = (vars(o).get("mode") for o in self.objectives)
        return next((m for m in modes if isinstance(m, str)), "pgd")

    @property
    def _free_delta(self) -> torch.Tensor | None:
        o = self._objective(AdversarialTraining)
        return None if o is None else o.delta

    @property
    def tripwire_attack(self) -> Attack | None:
        return None if self.tripwire is None else self.tripwire.attack

    @property
    def tripwire_batches(self) -> int:
        return 0 if self.tripwire is None else self.tripwire.batches

    @property
    def tripwire_max_drop(self) -> float | None:
        return None if self.tripwire is None else self.tripwire.max_drop

    @property
    def tripwire_history(self) -> list[float]:
        return [] if self.tripwire is None else self.tripwire.history

    def configure_callbacks(self) -> list[pl.Callback]:
        # The 0.1.0 shorthand tripwire_batches > 0 brings its TripWire callback along.
        return [] if self.tripwire is None else [self.tripwire]

    # ---- training ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def step_generator(self, device: torch.device | str, step: int | None = None) -> torch.Generator | None:
        """Random starts of this step: keyed by (seed, global step, rank), so a resumed run draws the same.

        ``step`` overrides the trainer's global step (a loop without a Trainer, e.g. the benchmarks' plain-loop
        twin, passes its own optimizer-step count and so draws the noise ``Trainer.fit`` would).
        """
        if self.attack_seed is None:
            return None
        rank = self.trainer.global_rank if self._trainer is not None else 0
        if step is None:
            step = self.trainer.global_step if self._trainer is not None else 0
        generator = torch.Generator(device=device)
        generator.manual_seed((self.attack_seed * 1_000_003 + step * 7_919 + rank) % (2**63 - 1))
        return generator

    def training_batch(self, batch: Any) -> TrainingBatch:
        """The objectives' view of a training batch (subclasses with other batch formats override this)."""
        x, y, _ = split_batch(batch)
        return TrainingBatch(x, y, generator=self.step_generator(x.device))

    def objective_loss(self, batch: TrainingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum of the objectives on ``batch`` (in list order) and their merged logs."""
        for o in self.objectives:
            o.prepare(self, batch)
        total: torch.Tensor | None = None
        logs: dict[str, torch.Tensor] = {}
        for o in self.objectives:
            loss, values = o(self, batch)
            total = loss if total is None else total + loss
            logs.update(values)
        assert total is not None
        return total, logs

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """Return ``(loss, logits for accuracy, logs)`` for a training batch (one replay, no optimizer step)."""
        batch = TrainingBatch(x, y, generator=self.step_generator(x.device))
        loss, logs = self.objective_loss(batch)
        return loss, batch.input_logits(self), logs

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tb = self.training_batch(batch)
        if self.automatic_optimization:
            loss, logs = self.objective_loss(tb)
        else:
            loss, logs = self._replayed_step(tb)
        y = tb.y
        with torch.no_grad():
            logits = tb.input_logits(self)
        # Epoch-only values are accumulated here and logged once per epoch (on_train_epoch_end): a metric's
        # forward also computes the batch's own value, and every self.log call costs Lightning ~0.3-0.5 ms,
        # together a few % of a CPU fit for values nobody reads per step.
        self.train_acc.update(logits.detach(), y)
        for name, (acc_logits, acc_y) in tb.accuracies.items():
            self.objective_accuracies[name].update(acc_logits, acc_y)  # type: ignore[operator]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.epoch_means.add(logs, int(y.shape[0]))
        return loss

    def _log_training_epoch(self) -> None:
        """``train/acc``, the objectives' accuracies and the epoch means of their logs, then reset them."""
        accuracies = [("acc", self.train_acc), *self.objective_accuracies.items()]
        for name, metric in accuracies:
            if metric.update_called:  # type: ignore[union-attr, operator]
                # compute() synchronises over processes: every rank logs the same value.
                self.log(f"train/{name}", metric.compute(), on_step=False, on_epoch=True)  # type: ignore[operator]
                metric.reset()  # type: ignore[operator]
        self.epoch_means.log(self, prefix="train/")

    def _replayed_step(self, tb: TrainingBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Manual optimization: one optimizer step per replay of the minibatch (free adversarial training)."""
        optimizer = self.optimizers()
        replays = max(o.replays for o in self.objectives)
        for r in range(replays):
            tb.start_replay(r)
            loss, logs = self.objective_loss(tb)
            optimizer.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(loss)
            optimizer.step()  # type: ignore[union-attr]
            for o in self.objectives:
                o.after_backward(tb)
            if self.scheduler_factory is not None and self.scheduler_interval == "step":
                self._step_schedulers()
        return loss, logs

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

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        for sch in schedulers if isinstance(schedulers, list) else [schedulers]:
            if isinstance(sch, torch.optim.lr_scheduler.ReduceLROnPlateau):
                value = self.trainer.callback_metrics.get(self.scheduler_monitor)
                if value is not None:
                    sch.step(value)  # type: ignore[arg-type]
            elif sch is not None:
                sch.step()  # type: ignore[call-arg]

    def on_train_epoch_end(self) -> None:
        self._log_training_epoch()
        manual = not self.automatic_optimization
        if manual and self.scheduler_factory is not None and self.scheduler_interval == "epoch":
            self._step_schedulers()

    # ---- checkpoint state ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for o in self.objectives:
            if o.state_key is None:
                continue
            state = dict(o.state_dict())
            for key in o.per_rank_state:
                if key in state:
                    # e.g. free training's perturbation: every rank carries its own; keep them all, [ranks, ...]
                    value = state[key]
                    if self._trainer is not None and self.trainer.world_size > 1:
                        value = self.trainer.strategy.all_gather(value)
                    else:
                        value = value.unsqueeze(0)
                    state[key] = value.detach().cpu()
            checkpoint[o.state_key] = state
        if self.tripwire is not None:
            # 0.1.0 kept the trip-wire history here; the TripWire callback also saves it in its own state.
            checkpoint.setdefault("adversarial_training", {})["tripwire_history"] = list(self.tripwire.history)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rank = self.trainer.global_rank if self._trainer is not None else 0
        for o in self.objectives:
            if o.state_key is not None and o.state_key in checkpoint:
                o.load_state_dict(checkpoint[o.state_key], rank=rank)
        legacy = checkpoint.get("adversarial_training", {}).get("tripwire_history")
        if self.tripwire is not None and legacy is not None:
            self.tripwire.history = [float(v) for v in legacy]
