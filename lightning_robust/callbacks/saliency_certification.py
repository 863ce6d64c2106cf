"""Log certified top-k robustness of sparsified SmoothGrad and saliency-map grids during validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_robust.interpret.saliency import (
    certified_topk_intersection,
    gradient_saliency,
    smoothgrad,
    sparsified_smoothgrad,
)
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.image_logging import log_image
from lightning_robust.utils.plotting import image_grid
from lightning_robust.utils.validation import (
    check_fraction,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_seed,
)

__all__ = ["SaliencyCertification"]


def _to_unit(maps: torch.Tensor) -> torch.Tensor:
    """|maps| scaled per sample to [0, 1] and averaged over channels, for display ([N, 1, H, W])."""
    a = maps.abs().mean(1, keepdim=True)
    return a / a.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)


class SaliencyCertification(pl.Callback):
    """At the end of validation epochs, certify the saliency maps of a few validation inputs.

    The first ``num_samples`` validation inputs each process sees are explained by sparsified SmoothGrad
    (Levine et al., arXiv 1905.12105); :func:`~lightning_robust.interpret.certified_topk_intersection`
    turns each map into the number of its top-k pixels guaranteed to stay top-k under any L2 perturbation
    of each radius. Logged (averaged over samples and processes): ``saliency/certified_topk@<r>`` (fraction
    of ``k``) for each radius. On global rank 0 an image grid (inputs; gradient; SmoothGrad; sparsified
    SmoothGrad) goes to the logger and to ``<log_dir>/images`` via :func:`~lightning_robust.utils.log_image`.

    Works on any LightningModule whose ``forward`` (or the submodule named by ``model_attr``) maps images
    to logits; the map explains the predicted class. Inputs come from ``batch[0]`` / ``split_batch``.

    Args:
        radii: L2 radii to certify (pixel units), each >= 0.
        num_samples: validation inputs per process.
        n_samples: noise draws per input (the paper: 8192; more draws shrink the Hoeffding error).
        sigma: smoothing noise standard deviation.
        tau: sparsification parameter (fraction of pixels set to 1 per draw).
        k_fraction: ``k / d`` of the certified top-k set (the paper: 0.2).
        confidence: probability with which the sampling correction holds.
        batch_size: most noisy inputs per forward pass.
        every_n_epochs: certify every this many epochs (1 = every epoch).
        log_images: also log the saliency grid.
        seed: seed of the noise (the same draws every epoch, so curves compare the model, not the noise).
        model_attr: dotted name of the submodule to explain (``None``: the LightningModule itself).

    Raises:
        ValueError: on an empty or negative radius list or any invalid count, scale or fraction.

    Example:
        >>> cb = SaliencyCertification(radii=(0.05, 0.1), num_samples=8, n_samples=512, sigma=0.15)
        >>> pl.Trainer(callbacks=[cb]).fit(model, datamodule=dm)
    """

    def __init__(
        self,
        radii: Sequence[float] = (0.05, 0.1, 0.2),
        num_samples: int = 8,
        n_samples: int = 512,
        sigma: float = 0.15,
        tau: float = 0.1,
        k_fraction: float = 0.2,
        confidence: float = 0.95,
        batch_size: int = 256,
        every_n_epochs: int = 1,
        log_images: bool = True,
        seed: int = 0,
        model_attr: str | None = None,
    ) -> None:
        check_seed("seed", seed)
        radii = [float(r) for r in radii]
        if not radii:
            raise ValueError("radii must list at least one L2 radius")
        for r in radii:
            check_non_negative("radii", r)
        check_positive_int("num_samples", num_samples)
        check_positive_int("n_samples", n_samples)
        check_positive("sigma", sigma)
        check_fraction("tau", tau, inclusive_low=False, inclusive_high=True)
        check_fraction("k_fraction", k_fraction, inclusive_low=False, inclusive_high=True)
        check_fraction("confidence", confidence)
        check_positive_int("batch_size", batch_size)
        check_positive_int("every_n_epochs", every_n_epochs)
        self.radii = radii
        self.num_samples = num_samples
        self.n_samples = n_samples
        self.sigma = float(sigma)
        self.tau = float(tau)
        self.k_fraction = float(k_fraction)
        self.confidence = float(confidence)
        self.batch_size = batch_size
        self.every_n_epochs = every_n_epochs
        self.log_images = bool(log_images)
        self.seed = int(seed)
        self.model_attr = model_attr
        self._inputs: list[torch.Tensor] = []
        self.last: dict[str, float] = {}

    @staticmethod
    def metric_name(radius: float) -> str:
        return f"saliency/certified_topk@{radius:g}"

    def _active(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        return pl_module if self.model_attr is None else pl_module.get_submodule(self.model_attr)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._inputs = []

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        have = sum(t.shape[0] for t in self._inputs)
        if not self._active(trainer) or have >= self.num_samples:
            return
        x = split_batch(batch).x if not torch.is_tensor(batch) else batch
        self._inputs.append(x[: self.num_samples - have].detach().clone())

    def certify(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparsified SmoothGrad maps of ``x`` and their certified top-k fractions ``[B, len(radii)]``."""
        gen = torch.Generator().manual_seed(self.seed)
        maps = sparsified_smoothgrad(model, x, n_samples=self.n_samples, sigma=self.sigma, tau=self.tau,
                                     batch_size=self.batch_size, generator=gen)
        k = max(1, int(self.k_fraction * x[0].numel()))
        cert = certified_topk_intersection(maps, k, self.radii, self.sigma, self.n_samples, self.confidence)
        return maps, cert.double() / k

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer) or not self._inputs:
            return
        x = torch.cat(self._inputs)
        model = self._model(pl_module)
        maps, frac = self.certify(model, x)
        self.last = {}
        for j, r in enumerate(self.radii):
            value = frac[:, j].mean()
            name = self.metric_name(r)
            pl_module.log(name, value.float(), sync_dist=True)
            self.last[name] = float(value)
        if self.log_images and trainer.is_global_zero and x.ndim == 4:
            n = min(8, x.shape[0])
            xs = x[:n]
            grad = gradient_saliency(model, xs)
            gen = torch.Generator().manual_seed(self.seed)
            smooth = smoothgrad(model, xs, n_samples=min(self.n_samples, 256), sigma=self.sigma,
                                batch_size=self.batch_size, generator=gen)
            shown = xs.mean(1, keepdim=True)
            grid = torch.cat([shown.clamp(0, 1), _to_unit(grad), _to_unit(smooth), maps[:n].mean(1, keepdim=True)])
            captions = [""] * n + ["gradient"] * n + ["SmoothGrad"] * n + [
                f"cert {float(frac[i, 0]):.2f}" for i in range(n)]
            title = (f"input / |gradient| / |SmoothGrad| / sparsified SmoothGrad (certified top-k at "
                     f"r={self.radii[0]:g})")
            log_image(trainer, "saliency/maps", image_grid(grid.cpu(), captions, nrow=n, cell=48, title=title))

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = {str(k): float(v) for k, v in state_dict.get("last", {}).items()}
