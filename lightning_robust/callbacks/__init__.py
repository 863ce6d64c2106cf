"""Callbacks usable on any LightningModule (they never import ``lightning_robust.models``)."""

from lightning_robust.callbacks.certification import CertificationCallback

__all__ = ["CertificationCallback"]
