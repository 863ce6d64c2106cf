"""Callbacks usable on any LightningModule (they never import ``lightning_robust.models``)."""

from lightning_robust.callbacks.certification import CertificationCallback
from lightning_robust.callbacks.gan_evaluation import GANEvaluation
from lightning_robust.callbacks.likelihood_histogram import LikelihoodHistogram
from lightning_robust.callbacks.poison_filter import FILTER_METHODS, DeepKNNPoisonFilter
from lightning_robust.callbacks.robustness_evaluation import RobustnessEvaluation
from lightning_robust.callbacks.saliency_certification import SaliencyCertification
from lightning_robust.callbacks.sample_grid import SampleGrid

__all__ = [
    "CertificationCallback",
    "DeepKNNPoisonFilter",
    "FILTER_METHODS",
    "GANEvaluation",
    "LikelihoodHistogram",
    "RobustnessEvaluation",
    "SaliencyCertification",
    "SampleGrid",
]
