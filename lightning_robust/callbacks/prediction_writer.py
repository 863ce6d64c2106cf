"""Write ``trainer.predict`` outputs to disk with Lightning's :class:`BasePredictionWriter`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

__all__ = ["PredictionWriter"]


def _tensors(value: Any) -> Any:
    """The prediction with tensors detached on the CPU (containers kept), so the file loads weights-only."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tensors(v) for v in value]
    return value


class PredictionWriter(BasePredictionWriter):
    """Save every process's predictions of a ``predict`` run as ``<output_dir>/predictions_rank<r>.pt``.

    The file holds ``{"predictions": [...], "batch_indices": [...]}``: one entry per dataloader, each a list
    of per-batch outputs (tensors on the CPU) and the dataset indices of each batch's samples (from the
    sampler, so a DDP run's shards can be put back in order). Load with
    ``torch.load(path, weights_only=True)``.

    Args:
        output_dir: folder of the files (created when needed).

    Example:
        >>> trainer = pl.Trainer(callbacks=[PredictionWriter("runs/predictions")])
        >>> trainer.predict(model, datamodule=dm, return_predictions=False)
    """

    def __init__(self, output_dir: str | Path) -> None:
        super().__init__(write_interval="epoch")
        if not str(output_dir):
            raise ValueError("output_dir must be a folder path, got an empty string")
        self.output_dir = Path(output_dir)
        self.last_path: Path | None = None

    def write_on_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        # Lightning flattens the predictions of a single dataloader (a list per dataloader otherwise); its batch
        # indices come as one list per dataloader either way.
        single = len(trainer.num_predict_batches) <= 1
        preds = [list(predictions)] if single else [list(p) for p in predictions]
        indices = [[[int(i) for i in batch] for batch in d] for d in (batch_indices or [])]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"predictions_rank{trainer.global_rank}.pt"
        torch.save({"predictions": _tensors(preds), "batch_indices": indices}, path)
        self.last_path = path
