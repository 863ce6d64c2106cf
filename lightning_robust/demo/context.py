"""Shared state of a demo run: output folder, seed, device, and artefacts sections hand to each other."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

__all__ = ["DemoContext", "read_csv_metrics"]


def read_csv_metrics(trainer: pl.Trainer) -> list[dict[str, str]]:
    """Rows of the ``metrics.csv`` written by the trainer's CSVLogger (empty when there is none)."""
    import csv

    log_dir = getattr(trainer.logger, "log_dir", None)
    path = Path(log_dir) / "metrics.csv" if log_dir else None
    if path is None or not path.is_file():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


@dataclass
class DemoContext:
    """What every demo section receives.

    Attributes:
        out_dir: the report folder (``runs/demo``).
        seed: global seed; each section re-seeds with it for reproducibility.
        fast: shrink every section (used by the tests).
        artifacts: objects shared between sections, e.g. ``"digits_classifier"`` (a trained Classifier
            that later sections attack, certify or interpret).
    """

    out_dir: Path
    seed: int = 0
    fast: bool = False
    artifacts: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def trainer(self, name: str, **kwargs: Any) -> pl.Trainer:
        """A quiet CPU/GPU trainer logging CSV under ``out_dir/logs/<name>``."""
        from pytorch_lightning.loggers import CSVLogger

        defaults: dict[str, Any] = dict(
            accelerator="auto",
            devices=1,
            logger=CSVLogger(self.out_dir / "logs", name=name),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            deterministic=True,
            log_every_n_steps=5,
        )
        defaults.update(kwargs)
        return pl.Trainer(**defaults)

    def seed_everything(self) -> None:
        pl.seed_everything(self.seed, workers=True, verbose=False)
        torch.use_deterministic_algorithms(False)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started
