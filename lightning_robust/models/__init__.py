"""LightningModules."""

from lightning_robust.models.classifier import Classifier
from lightning_robust.models.domain_adaptation import NWDomainAdaptation
from lightning_robust.models.gan import GAN
from lightning_robust.models.nw_gan import NWGAN

__all__ = ["Classifier", "GAN", "NWDomainAdaptation", "NWGAN"]
