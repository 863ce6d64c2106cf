"""Log a grid of generated samples (torchvision's ``make_grid``) to the logger and as PNG files."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torchvision.utils import make_grid

from lightning_robust.utils.image_logging import log_image
from lightning_robust.utils.validation import check_non_negative, check_positive_int

__all__ = ["SampleGrid"]


class SampleGrid(pl.Callback):
    """Every ``every_n_epochs`` training epochs, log a grid of ``n`` samples from the module's generator.

    Samples come from ``pl_module.sample(n, use_ema=...)`` (a :class:`~lightning_robust.models.GAN` draws
    them from its fixed latent batch, so successive grids show the same latents evolving); modules without
    ``sample`` must have ``fixed_latents`` and are called as ``module(fixed_latents[:n])`` in eval mode.
    The grid goes to TensorBoard / W&B style loggers and to ``<log_dir>/images/<tag>_step<k>.png`` via
    :func:`~lightning_robust.utils.log_image`, on global rank 0 only (generation needs no other rank).

    Args:
        n: number of samples (at most the module's fixed latent batch for reproducible grids).
        nrow: images per grid row.
        every_n_epochs: log after every n-th epoch (and after the last one).
        tag: logger tag and file-name stem.
        use_ema: sample the EMA generator when the module keeps one.
        padding: pixels between images.
        pad_value: padding intensity in [0, 1].

    Attributes:
        last_path: path of the last PNG written (``None`` before the first, and on ranks other than 0).

    Example:
        >>> pl.Trainer(callbacks=[SampleGrid(n=64, nrow=8)]).fit(gan, datamodule=dm)
    """

    def __init__(self, n: int = 64, nrow: int = 8, every_n_epochs: int = 1, tag: str = "samples",
                 use_ema: bool = True, padding: int = 2, pad_value: float = 1.0) -> None:
        super().__init__()
        check_positive_int("n", n)
        check_positive_int("nrow", nrow)
        check_positive_int("every_n_epochs", every_n_epochs)
        check_non_negative("padding", padding)
        check_non_negative("pad_value", pad_value)
        self.n, self.nrow, self.every_n_epochs, self.tag = n, nrow, every_n_epochs, tag
        self.use_ema, self.padding, self.pad_value = use_ema, int(padding), float(pad_value)
        self.last_path: Path | None = None

    @torch.no_grad()
    def grid(self, pl_module: pl.LightningModule) -> torch.Tensor:
        """The ``[3, H, W]`` (or ``[C, H, W]``) grid of the module's current samples, in [0, 1], on the CPU."""
        sample = getattr(pl_module, "sample", None)
        if callable(sample):
            images = sample(self.n, use_ema=self.use_ema)
        else:
            fixed = getattr(pl_module, "fixed_latents", None)
            if not torch.is_tensor(fixed):
                raise TypeError(f"{type(pl_module).__name__} has neither `sample` nor `fixed_latents`")
            was_training = pl_module.training
            pl_module.eval()
            try:
                images = pl_module(fixed[: self.n])
            finally:
                pl_module.train(was_training)
        if images.ndim != 4:
            raise ValueError(f"samples must be images [N, C, H, W], got shape {tuple(images.shape)}")
        return make_grid(images.detach().float().cpu().clamp(0, 1), nrow=self.nrow, padding=self.padding,
                         pad_value=self.pad_value)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if (epoch % self.every_n_epochs and not last) or trainer.global_rank != 0:
            return
        self.last_path = log_image(trainer, self.tag, self.grid(pl_module))
