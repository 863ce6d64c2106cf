"""Training objectives as composable parts: ``objective(module, batch) -> (loss, logs)``.

:class:`~lightning_robust.models.Classifier` sums a list of them (``objectives=[...]``, also from YAML with
``class_path``). Adding an objective: one new file with an :class:`Objective` subclass, its import and name
here, and its tests.
"""

from lightning_robust.objectives.adversarial import AdversarialTraining
from lightning_robust.objectives.base import Objective, ObjectiveOutput, TrainingBatch
from lightning_robust.objectives.certified_radius import CertifiedRadius
from lightning_robust.objectives.cross_entropy import CrossEntropy
from lightning_robust.objectives.distillation import Distillation
from lightning_robust.objectives.saliency_consistency import SaliencyConsistency
from lightning_robust.objectives.text_adversarial import TextAdversarialTraining
from lightning_robust.objectives.trades import TRADES

__all__ = [
    "AdversarialTraining",
    "CertifiedRadius",
    "CrossEntropy",
    "Distillation",
    "Objective",
    "ObjectiveOutput",
    "SaliencyConsistency",
    "TRADES",
    "TextAdversarialTraining",
    "TrainingBatch",
]
