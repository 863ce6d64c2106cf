"""Callbacks usable on any LightningModule (they never import ``lightning_robust.models``)."""

__all__: list[str] = []
