"""The training-objective protocol: ``objective(module, batch) -> (loss, logs)``.

A LightningModule's training loss is a sum of objectives (clean cross-entropy, adversarial training, a
certified-radius term, distillation, saliency consistency, text adversarial training, ...). Each one is a
small object with typed, YAML-buildable constructor arguments; :class:`~lightning_robust.models.Classifier`
composes a list of them, so a new method adds an objective instead of a subclass that rewires its parent.

The objectives of one step share a :class:`TrainingBatch`. An objective that changes the training inputs
(adversarial training) replaces :attr:`TrainingBatch.inputs`, and the objectives after it in the list train
on those (the certified-radius term on the adversarial examples, as in the single-class implementation this
replaces); :meth:`TrainingBatch.input_logits` runs the model on the current inputs once and shares the
logits, whose accuracy is logged as ``train/acc``.

Pure PyTorch: no Lightning import. The module is anything callable on the batch's inputs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Objective", "ObjectiveOutput", "TrainingBatch"]

#: What an objective returns: its (already weighted) loss and the values to log as ``train/<name>``.
ObjectiveOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


@dataclass
class TrainingBatch:
    """One training minibatch as the objectives see it.

    Attributes:
        x: the clean inputs (images in [0, 1], or token ids for text).
        y: the labels.
        forward_kwargs: extra keyword arguments of ``module(inputs, ...)`` (``attention_mask`` for text).
        generator: random generator for the attacks' random starts (``None``: the global RNG).
        inputs: the inputs the loss terms train on; ``x`` until an objective replaces them.
        logits: ``module(inputs)``, computed once by :meth:`input_logits` (``train/acc`` is their accuracy).
        accuracies: extra accuracies to log, ``name -> (logits, labels)`` (e.g. ``adv_acc`` for text).
        cache: values kept across the replays of one minibatch (e.g. the teacher's logits).
        replay: index of the current replay of this minibatch (free adversarial training replays it).
    """

    x: torch.Tensor
    y: torch.Tensor
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    generator: torch.Generator | None = None
    inputs: torch.Tensor = None  # type: ignore[assignment]  # set to x in __post_init__
    logits: torch.Tensor | None = None
    accuracies: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    replay: int = 0

    def __post_init__(self) -> None:
        if self.inputs is None:
            self.inputs = self.x

    def forward(self, module: nn.Module | Any, inputs: torch.Tensor) -> torch.Tensor:
        """``module(inputs, **forward_kwargs)``."""
        out: torch.Tensor = module(inputs, **self.forward_kwargs)
        return out

    def input_logits(self, module: nn.Module | Any) -> torch.Tensor:
        """The logits of the current training inputs, computed once per replay and shared."""
        if self.logits is None:
            self.logits = self.forward(module, self.inputs)
        return self.logits

    def start_replay(self, replay: int) -> None:
        """Forget the previous replay's inputs and logits (the cache stays)."""
        self.replay = replay
        self.inputs = self.x
        self.logits = None
        self.accuracies = {}


class Objective(ABC):
    """One term of a training loss: ``objective(module, batch) -> (loss, logs)``.

    Subclasses implement :meth:`__call__`; the hooks below have no-op defaults and exist for objectives that
    change the inputs (:meth:`prepare`), need several optimizer steps per minibatch (:attr:`replays`,
    :meth:`after_backward`: free adversarial training) or carry state across steps (:meth:`state_dict`,
    saved in the module's checkpoint under :attr:`state_key`).

    Attributes:
        replays: optimizer steps per minibatch (> 1 switches the module to manual optimization).
        accuracy_names: names of the accuracies this objective puts into :attr:`TrainingBatch.accuracies`
            (the module creates one accuracy metric for each and logs it as ``train/<name>``).
        state_key: checkpoint key of :meth:`state_dict` (``None``: stateless).
        per_rank_state: keys of :meth:`state_dict` whose tensor differs per process: the module saves them
            gathered over the ranks (``[ranks, ...]``) and :meth:`load_state_dict` picks its rank's entry.
    """

    replays: int = 1
    accuracy_names: tuple[str, ...] = ()
    state_key: str | None = None
    per_rank_state: tuple[str, ...] = ()

    @abstractmethod
    def __call__(self, module: nn.Module, batch: TrainingBatch) -> ObjectiveOutput:
        """Return this objective's weighted loss on ``batch`` and the values to log."""

    def setup(self, module: nn.Module, num_classes: int) -> None:  # noqa: B027  # optional hook
        """Check the objective against the module it trains (called once, from the module's constructor)."""

    def prepare(self, module: nn.Module, batch: TrainingBatch) -> None:  # noqa: B027  # optional hook
        """Called on every objective, in order, before any is evaluated on a replay (e.g. to set inputs)."""

    def after_backward(self, batch: TrainingBatch) -> None:  # noqa: B027  # optional hook
        """Called after each replay's backward pass, with ``batch.inputs.grad`` available (manual mode)."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (tensors and primitives only: checkpoints load weights-only)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any], rank: int = 0) -> None:  # noqa: B027  # optional hook
        """Restore :meth:`state_dict`; ``rank`` picks a per-rank entry where the state holds one per rank."""
