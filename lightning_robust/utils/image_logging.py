"""Send an image or a matplotlib figure to each of a Trainer's loggers through that logger's own image API.

Dispatch is explicit, on the logger's type:

* ``TensorBoardLogger``: ``SummaryWriter.add_figure`` for figures, ``add_image`` for image tensors;
* ``WandbLogger``: ``WandbLogger.log_image`` (needs ``wandb``);
* ``MLFlowLogger``: ``MlflowClient.log_image`` into the run's artifacts under ``images/`` (needs ``mlflow``);
* ``CSVLogger`` and any other logger with a ``log_dir``: a PNG under ``<log_dir>/images/``;
* no logger: a PNG under ``<trainer.default_root_dir>/images/`` when that folder was set explicitly; with
  the Trainer's default (the current directory) nothing is written, so a script never litters the folder it
  is started from. That is silent, as is ``fast_dev_run``'s ``DummyLogger``: ``logger=False`` and
  ``fast_dev_run`` are the user's own choice not to log (and the callbacks keep their last image in memory).

Errors of a logger's API propagate (nothing is swallowed).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from pytorch_lightning.loggers.logger import DummyLogger
from pytorch_lightning.utilities import rank_zero_warn

from lightning_robust.utils.plotting import figure_to_tensor, save_figure

__all__ = ["log_image"]

ImageLike = torch.Tensor | Image.Image | Figure


def _to_uint8(image: torch.Tensor | Image.Image) -> torch.Tensor:
    """``[3, H, W]`` uint8 tensor from a ``[C, H, W]`` float tensor in [0, 1] (C = 1 or 3) or a PIL image."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    if not torch.is_tensor(image) or image.ndim != 3 or image.shape[0] not in (1, 3):
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(f"image must be a [C, H, W] tensor with C = 1 or 3, a PIL image or a matplotlib Figure, "
                         f"got {shape}")
    t = image.detach().float().cpu()
    if not bool(torch.isfinite(t).all()):
        raise ValueError("image holds NaN or inf values")
    t = t.clamp(0, 1)
    if t.shape[0] == 1:
        t = t.repeat(3, 1, 1)
    return (t * 255).round().to(torch.uint8)


def _file_name(tag: str, step: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}_step{step:07d}.png"


def _write_png(image: ImageLike, path: Path) -> Path:
    if isinstance(image, Figure):
        return save_figure(image, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_to_uint8(image).permute(1, 2, 0).numpy()).save(path)
    return path


def _pixels(image: ImageLike) -> torch.Tensor:
    return figure_to_tensor(image) if isinstance(image, Figure) else _to_uint8(image)


def log_image(trainer: Any, tag: str, image: ImageLike, step: int | None = None) -> Path | None:
    """Log ``image`` under ``tag`` with each of ``trainer.loggers`` (see the module docstring for the dispatch).

    Runs on global rank 0 only (the other ranks return ``None`` at once; no collective is called, so one
    rank logging cannot deadlock a multi-process run).

    Args:
        trainer: a ``pl.Trainer`` (only public attributes are used).
        tag: name such as ``"saliency/grid"``; characters outside ``[A-Za-z0-9_.-]`` become ``_`` in file names.
        image: a ``[C, H, W]`` tensor in [0, 1] (C = 1 or 3), a PIL image or a matplotlib ``Figure``.
        step: global step (defaults to ``trainer.global_step``).

    Returns:
        The path of the last PNG written (CSV-style loggers, no logger), else ``None``.

    Raises:
        ValueError: on an image of the wrong shape or with NaN/inf values.
    """
    if getattr(trainer, "global_rank", 0) != 0:
        return None
    step = int(trainer.global_step if step is None else step)
    loggers: list[Logger] = list(getattr(trainer, "loggers", None) or [])
    written: Path | None = None
    for logger in loggers:
        if isinstance(logger, DummyLogger):  # fast_dev_run: logging is switched off on purpose
            continue
        if isinstance(logger, TensorBoardLogger):
            if isinstance(image, Figure):
                logger.experiment.add_figure(tag, image, global_step=step, close=False)
            else:
                logger.experiment.add_image(tag, _to_uint8(image), global_step=step, dataformats="CHW")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[_pixels(image).permute(1, 2, 0).numpy()], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_image(logger.run_id, _pixels(image).permute(1, 2, 0).numpy(),
                                        artifact_file=f"images/{_file_name(tag, step)}")
        elif isinstance(logger, CSVLogger) or getattr(logger, "log_dir", None):
            written = _write_png(image, Path(str(logger.log_dir)) / "images" / _file_name(tag, step))
        else:
            rank_zero_warn(f"log_image: {type(logger).__name__} has no image API known here and no log_dir; "
                           f"{tag!r} is not logged by it")
    if not loggers:
        root = getattr(trainer, "default_root_dir", None)
        if root is None or Path(root).resolve() == Path(os.getcwd()).resolve():
            return None  # logger=False and no chosen folder: never write into the current directory
        written = _write_png(image, Path(root) / "images" / _file_name(tag, step))
    return written
