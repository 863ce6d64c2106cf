"""LightningModules."""

from lightning_robust.models.ard import ARDStudent
from lightning_robust.models.classifier import Classifier
from lightning_robust.models.distilled_gan import DistilledGAN
from lightning_robust.models.domain_adaptation import NWDomainAdaptation
from lightning_robust.models.entropic_gan import EntropicGAN
from lightning_robust.models.gan import GAN
from lightning_robust.models.interpretation import InterpretationRegularizedClassifier
from lightning_robust.models.nw_gan import NWGAN
from lightning_robust.models.text_classifier import TextClassifier

__all__ = [
    "ARDStudent",
    "Classifier",
    "DistilledGAN",
    "EntropicGAN",
    "GAN",
    "InterpretationRegularizedClassifier",
    "NWDomainAdaptation",
    "NWGAN",
    "TextClassifier",
]
