"""Log a grid of generated samples (torchvision's ``make_grid``) to the logger and as PNG files."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torchvision.utils import make_grid

from lightning_robust.callbacks.evaluation_callback import EvaluationCallback, renamed_argument
from lightning_robust.utils.image_logging import log_image
from lightning_robust.utils.validation import check_non_negative, check_positive_int

__all__ = ["SampleGrid"]


class SampleGrid(EvaluationCallback):
    """Log a grid of ``num_samples`` samples from the module's generator, during fit, validate and test.

    During fit it logs at the end of training epochs ``n-1, 2n-1, ...`` (``every_n_epochs=n``; 0: never
    during fit); ``trainer.validate`` and ``trainer.test`` log one grid at the end of their loop.
    Samples come from ``pl_module.sample(n, use_ema=...)`` (a :class:`~lightning_robust.models.GAN` draws
    them from its fixed latent batch, so successive grids show the same latents evolving); modules without
    ``sample`` must have ``fixed_latents`` and are called as ``module(fixed_latents[:n])`` in eval mode
    (checked when the run starts, before the first step). The grid goes to TensorBoard / W&B style loggers and to
    ``<log_dir>/images/<prefix>_step<k>.png`` via :func:`~lightning_robust.utils.log_image`, on global rank 0
    only (generation needs no other rank).

    Args:
        num_samples: number of samples (at most the module's fixed latent batch for reproducible grids).
        nrow: images per grid row.
        every_n_epochs: during fit, log after training epochs ``n-1, 2n-1, ...`` (0: never during fit).
        prefix: logger tag and file-name stem.
        use_ema: sample the EMA generator when the module keeps one.
        padding: pixels between images.
        pad_value: padding intensity in [0, 1].
        n: deprecated name of ``num_samples``.
        tag: deprecated name of ``prefix``.

    Attributes:
        last_path: path of the last PNG written (``None`` before the first, and on ranks other than 0).

    Raises:
        ValueError: on invalid numbers. TypeError: when the run starts, for a module with neither ``sample`` nor
            ``fixed_latents``.

    Example:
        >>> pl.Trainer(callbacks=[SampleGrid(num_samples=64, nrow=8)]).fit(gan, datamodule=dm)
    """

    uses_subset = False
    fit_hook = "train"

    def __init__(self, num_samples: int = 64, nrow: int = 8, every_n_epochs: int = 1, prefix: str = "samples",
                 use_ema: bool = True, padding: int = 2, pad_value: float = 1.0, n: int | None = None,
                 tag: str | None = None) -> None:
        num_samples = renamed_argument("SampleGrid", "n", n, "num_samples", num_samples, 64)
        prefix = renamed_argument("SampleGrid", "tag", tag, "prefix", prefix, "samples")
        super().__init__(every_n_epochs=every_n_epochs, prefix=prefix, net=None, num_samples=num_samples)
        check_positive_int("nrow", nrow)
        check_non_negative("padding", padding)
        check_non_negative("pad_value", pad_value)
        self.nrow = nrow
        self.use_ema, self.padding, self.pad_value = use_ema, int(padding), float(pad_value)
        self.last_path: Path | None = None

    @property
    def n(self) -> int:
        """Deprecated alias of :attr:`num_samples`."""
        assert self.num_samples is not None
        return self.num_samples

    @property
    def tag(self) -> str:
        """Deprecated alias of :attr:`prefix`."""
        return self.prefix

    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "sample", None)) and not torch.is_tensor(
                getattr(pl_module, "fixed_latents", None)):
            raise TypeError(f"SampleGrid needs a generator module: {type(pl_module).__name__} has neither "
                            "`sample(n, use_ema=...)` nor a `fixed_latents` tensor")

    @torch.no_grad()
    def grid(self, pl_module: pl.LightningModule) -> torch.Tensor:
        """The ``[3, H, W]`` (or ``[C, H, W]``) grid of the module's current samples, in [0, 1], on the CPU."""
        sample = getattr(pl_module, "sample", None)
        if callable(sample):
            images = sample(self.num_samples, use_ema=self.use_ema)
        else:
            fixed = getattr(pl_module, "fixed_latents", None)
            if not torch.is_tensor(fixed):
                raise TypeError(f"{type(pl_module).__name__} has neither `sample` nor `fixed_latents`")
            was_training = pl_module.training
            pl_module.eval()
            try:
                images = pl_module(fixed[: self.num_samples])
            finally:
                pl_module.train(was_training)
        if images.ndim != 4:
            raise ValueError(f"samples must be images [N, C, H, W], got shape {tuple(images.shape)}")
        return make_grid(images.detach().float().cpu().clamp(0, 1), nrow=self.nrow, padding=self.padding,
                         pad_value=self.pad_value)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 data: tuple[torch.Tensor, torch.Tensor] | None, stage: str) -> None:
        if trainer.global_rank == 0:
            self.last_path = log_image(trainer, self.prefix, self.grid(pl_module))
