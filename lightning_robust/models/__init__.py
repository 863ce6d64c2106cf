"""LightningModules."""

from lightning_robust.models.classifier import Classifier
from lightning_robust.models.entropic_gan import EntropicGAN
from lightning_robust.models.gan import GAN

__all__ = ["Classifier", "EntropicGAN", "GAN"]
