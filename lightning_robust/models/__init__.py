"""LightningModules."""

from lightning_robust.models.classifier import Classifier
from lightning_robust.models.distilled_gan import DistilledGAN
from lightning_robust.models.gan import GAN

__all__ = ["Classifier", "DistilledGAN", "GAN"]
