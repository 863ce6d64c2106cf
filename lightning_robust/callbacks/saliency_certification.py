"""Log certified top-k robustness of sparsified SmoothGrad and saliency-map grids during validation."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_robust.callbacks.evaluation_callback import EvaluationCallback, renamed_argument
from lightning_robust.interpret.saliency import (
    certified_topk_intersection,
    gradient_saliency,
    smoothgrad,
    sparsified_smoothgrad,
)
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


class SaliencyCertification(EvaluationCallback):
    """In validation and test, certify the saliency maps of a few inputs of the shared evaluated subset.

    The first ``num_samples`` inputs of the evaluation subset (shared with the other evaluation callbacks)
    are explained by sparsified SmoothGrad (Levine et al., arXiv 1905.12105);
    :func:`~lightning_robust.interpret.certified_topk_intersection` turns each map into the number of its
    top-k pixels guaranteed to stay top-k under any L2 perturbation of each radius. Logged (averaged over
    samples and processes): ``{prefix}/certified_topk@<r>`` (fraction of ``k``) for each radius. On global
    rank 0 an image grid (inputs; gradient; SmoothGrad; sparsified SmoothGrad) goes to the logger and to
    ``<log_dir>/images`` via :func:`~lightning_robust.utils.log_image`.

    Works on any LightningModule whose ``forward`` (or the submodule named by ``net``) maps images to
    logits; the map explains the predicted class. ``setup`` checks ``net`` before the first step.

    Args:
        radii: L2 radii to certify (pixel units), each >= 0.
        num_samples: inputs to explain (over all processes).
        n_samples: noise draws per input (the paper: 8192; more draws shrink the Hoeffding error).
        sigma: smoothing noise standard deviation.
        tau: sparsification parameter (fraction of pixels set to 1 per draw).
        k_fraction: ``k / d`` of the certified top-k set (the paper: 0.2).
        confidence: probability with which the sampling correction holds.
        batch_size: most noisy inputs per forward pass.
        every_n_epochs: during fit, certify after epochs ``n-1, 2n-1, ...`` (0: never during fit).
        log_images: also log the saliency grid.
        seed: seed of the noise (the same draws every epoch, so curves compare the model, not the noise).
        net: dotted name of the submodule to explain (``None``: the LightningModule itself).
        prefix: first component of the logged names.
        prog_bar: show the numbers in the progress bar.
        model_attr: deprecated name of ``net``.

    Raises:
        ValueError: on an empty or negative radius list or any invalid count, scale or fraction; in
            ``setup``, on a ``net`` that is not a submodule (never a bare ``AttributeError``).

    Example:
        >>> cb = SaliencyCertification(radii=(0.05, 0.1), num_samples=8, n_samples=512, sigma=0.15)
        >>> pl.Trainer(callbacks=[cb]).test(model, datamodule=dm)[0]["saliency/certified_topk@0.1"]
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
        net: str | None = None,
        prefix: str = "saliency",
        prog_bar: bool = False,
        model_attr: str | None = None,
    ) -> None:
        net = renamed_argument("SaliencyCertification", "model_attr", model_attr, "net", net, None)
        super().__init__(every_n_epochs=every_n_epochs, prefix=prefix, net=net, num_samples=num_samples,
                         prog_bar=prog_bar)
        check_seed("seed", seed)
        radii = [float(r) for r in radii]
        if not radii:
            raise ValueError("radii must list at least one L2 radius")
        for r in radii:
            check_non_negative("radii", r)
        check_positive_int("n_samples", n_samples)
        check_positive("sigma", sigma)
        check_fraction("tau", tau, inclusive_low=False, inclusive_high=True)
        check_fraction("k_fraction", k_fraction, inclusive_low=False, inclusive_high=True)
        check_fraction("confidence", confidence)
        check_positive_int("batch_size", batch_size)
        self.radii = radii
        self.n_samples = n_samples
        self.sigma = float(sigma)
        self.tau = float(tau)
        self.k_fraction = float(k_fraction)
        self.confidence = float(confidence)
        self.batch_size = batch_size
        self.log_images = bool(log_images)
        self.seed = int(seed)
        self.last: dict[str, float] = {}

    @property
    def model_attr(self) -> str | None:
        """Deprecated alias of :attr:`net`."""
        return self.net

    def metric_name(self, radius: float) -> str:
        return f"{self.prefix}/{self.metric_key(radius)}"

    @staticmethod
    def metric_key(radius: float) -> str:
        return f"certified_topk@{radius:g}"

    def certify(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparsified SmoothGrad maps of ``x`` and their certified top-k fractions ``[B, len(radii)]``."""
        gen = torch.Generator().manual_seed(self.seed)
        maps = sparsified_smoothgrad(model, x, n_samples=self.n_samples, sigma=self.sigma, tau=self.tau,
                                     batch_size=self.batch_size, generator=gen)
        k = max(1, int(self.k_fraction * x[0].numel()))
        cert = certified_topk_intersection(maps, k, self.radii, self.sigma, self.n_samples, self.confidence)
        return maps, cert.double() / k

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 data: tuple[torch.Tensor, torch.Tensor] | None, stage: str) -> None:
        model = self.resolve_net(pl_module)
        device = pl_module.device
        # [sum over samples of the certified fraction per radius..., samples], summed over processes
        sums = torch.zeros(len(self.radii) + 1, dtype=torch.float64, device=device)
        x: torch.Tensor | None = None
        if data is not None:
            x = data[0].to(device)
            maps, frac = self.certify(model, x)
            sums[:-1] = frac.sum(0).to(device)
            sums[-1] = x.shape[0]
        if trainer.world_size > 1:
            sums = trainer.strategy.reduce(sums, reduce_op="sum")
        n = float(sums[-1])
        values = {self.metric_key(r): float(sums[j]) / max(n, 1.0) for j, r in enumerate(self.radii)}
        self.last = {f"{self.prefix}/{k}": v for k, v in values.items()}
        self.log_metrics(pl_module, values, batch_size=int(n))
        if x is None:
            return
        if self.log_images and trainer.is_global_zero and x.ndim == 4:
            m = min(8, x.shape[0])
            xs = x[:m]
            grad = gradient_saliency(model, xs)
            gen = torch.Generator().manual_seed(self.seed)
            smooth = smoothgrad(model, xs, n_samples=min(self.n_samples, 256), sigma=self.sigma,
                                batch_size=self.batch_size, generator=gen)
            shown = xs.mean(1, keepdim=True)
            grid = torch.cat([shown.clamp(0, 1), _to_unit(grad), _to_unit(smooth), maps[:m].mean(1, keepdim=True)])
            captions = [""] * m + ["gradient"] * m + ["SmoothGrad"] * m + [
                f"cert {float(frac[i, 0]):.2f}" for i in range(m)]
            title = (f"input / |gradient| / |SmoothGrad| / sparsified SmoothGrad (certified top-k at "
                     f"r={self.radii[0]:g})")
            log_image(trainer, f"{self.prefix}/maps", image_grid(grid.cpu(), captions, nrow=m, cell=48, title=title))

    def state_dict(self) -> dict[str, Any]:
        return {"last": dict(self.last)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = {str(k): float(v) for k, v in state_dict.get("last", {}).items()}
