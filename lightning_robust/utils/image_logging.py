"""Send an image to whatever logger a Trainer has, and keep a PNG copy in the run's folder."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["log_image"]


def _to_pil(image: torch.Tensor | Image.Image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    t = image.detach().float().cpu().clamp(0, 1)
    if t.ndim != 3:
        raise ValueError(f"image must be [C, H, W], got shape {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.repeat(3, 1, 1)
    return Image.fromarray((t.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _log_dir(trainer: Any) -> str | None:
    """``trainer.log_dir`` without its ``strategy.broadcast``: this runs on rank 0 only, and a collective
    called by one rank deadlocks a multi-process run."""
    loggers = getattr(trainer, "loggers", None) or []
    if loggers:
        return getattr(loggers[0], "log_dir", None) or getattr(loggers[0], "save_dir", None)
    return None


def _png_root(trainer: Any) -> Path | None:
    """The logger's folder, else an explicitly chosen ``default_root_dir``; never the current directory.

    ``Trainer(default_root_dir=None)`` reports ``os.getcwd()``, and writing there left ``images/`` folders in
    users' projects (and in this repository); without a logger or a chosen root the PNG is skipped.
    """
    log_dir = _log_dir(trainer)
    if log_dir:
        return Path(log_dir)
    root = getattr(trainer, "default_root_dir", None)
    if not root or Path(root).resolve() == Path.cwd().resolve():
        return None
    return Path(root)


def log_image(trainer: Any, tag: str, image: torch.Tensor | Image.Image, step: int | None = None) -> Path | None:
    """Log ``image`` under ``tag``: to TensorBoard / W&B style loggers when present, and as a PNG.

    The PNG goes to ``<trainer.log_dir>/images/<tag>_step<step>.png`` on global rank 0 only (the
    other ranks return ``None``), so it works with CSVLogger; with no logger it goes to
    ``<default_root_dir>/images/`` when that was set to a folder other than the current directory, and
    is skipped otherwise (the return value is then ``None``): nothing is written into the working
    directory by default.

    Args:
        trainer: a ``pl.Trainer`` (only public attributes are used).
        tag: name such as ``"saliency/grid"``; characters outside ``[A-Za-z0-9_.-]`` become ``_`` in the file.
        image: ``[C, H, W]`` tensor in [0, 1] or a PIL image.
        step: global step (defaults to ``trainer.global_step``).
    """
    if getattr(trainer, "global_rank", 0) != 0:
        return None
    step = int(trainer.global_step if step is None else step)
    pil = _to_pil(image)
    arr = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    for logger in getattr(trainer, "loggers", []) or []:
        exp = getattr(logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image"):  # TensorBoard
            exp.add_image(tag, arr, global_step=step)
        elif hasattr(logger, "log_image"):  # WandbLogger, NeptuneLogger, ...
            with contextlib.suppress(TypeError):  # loggers differ in signature; PNG below is kept anyway
                logger.log_image(key=tag, images=[pil], step=step)
    root = _png_root(trainer)
    if root is None:
        return None
    out = root / "images" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}_step{step:07d}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    pil.save(out)
    return out
