"""Callbacks usable on any LightningModule (they never import ``lightning_robust.models``).

``AtomicCheckpointIO`` is a Trainer plugin rather than a callback; it lives here with the other Lightning
extension points."""

from lightning_robust.callbacks.atomic_checkpoint_io import AtomicCheckpointIO
from lightning_robust.callbacks.certification import CertificationCallback
from lightning_robust.callbacks.evaluation_callback import EvaluationCallback
from lightning_robust.callbacks.finite_loss_guard import FiniteLossGuard, NonFiniteLossError
from lightning_robust.callbacks.gan_evaluation import GANEvaluation
from lightning_robust.callbacks.likelihood_histogram import LikelihoodHistogram
from lightning_robust.callbacks.poison_filter import FILTER_METHODS, DeepKNNPoisonFilter
from lightning_robust.callbacks.prediction_writer import PredictionWriter
from lightning_robust.callbacks.rng_state import RNGStateCheckpoint
from lightning_robust.callbacks.robustness_evaluation import RobustnessEvaluation
from lightning_robust.callbacks.saliency_certification import SaliencyCertification
from lightning_robust.callbacks.sample_grid import SampleGrid
from lightning_robust.callbacks.tripwire import TripWire

__all__ = [
    "AtomicCheckpointIO",
    "CertificationCallback",
    "DeepKNNPoisonFilter",
    "EvaluationCallback",
    "FILTER_METHODS",
    "FiniteLossGuard",
    "GANEvaluation",
    "LikelihoodHistogram",
    "NonFiniteLossError",
    "PredictionWriter",
    "RNGStateCheckpoint",
    "RobustnessEvaluation",
    "SaliencyCertification",
    "SampleGrid",
    "TripWire",
]
