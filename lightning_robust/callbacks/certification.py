"""Log certified robustness (Singla & Feizi, arXiv 1902.01235) of any LightningModule's ReLU net."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_robust.callbacks.evaluation_callback import EvaluationCallback, renamed_argument
from lightning_robust.certify import CERTIFICATE_METHODS, certify
from lightning_robust.metrics import CertifiedAccuracy
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.image_logging import log_image
from lightning_robust.utils.plotting import histogram
from lightning_robust.utils.validation import check_choice, check_non_negative, check_positive_int

__all__ = ["AUTO_RADII_QUANTILES", "CertificationCallback"]

#: Quantiles of the first evaluation's certified radii (correct samples) that become the reported radii.
AUTO_RADII_QUANTILES = (0.25, 0.5, 0.75)


def _round2(r: float) -> float:
    """``r`` to two significant digits (readable metric names such as ``acc@0.034``)."""
    return float(f"{r:.2g}")


class CertificationCallback(EvaluationCallback):
    """Certify the shared evaluated subset in validation and test, and log certified accuracy.

    At the end of a due validation epoch (after epochs ``n-1, 2n-1, ...`` for ``every_n_epochs=n``), of
    ``trainer.validate`` and of ``trainer.test``, the callback computes the certified L2 radius of the
    predicted class (:func:`~lightning_robust.certify.certify` with ``method``, batched over the samples)
    for the first ``num_samples`` inputs of the evaluation subset shared with the other evaluation
    callbacks (split evenly across processes), and logs

    * ``{prefix}/{method}/mean_radius``: mean certified radius over those samples;
    * ``{prefix}/{method}/acc@{eps}``: certified accuracy at each radius (correct and certified beyond
      ``eps``; ``acc@0`` is the clean accuracy, the same number as ``RobustnessEvaluation``'s
      ``clean_acc`` at the same ``num_samples``), via :class:`~lightning_robust.metrics.CertifiedAccuracy`;
    * a histogram of the radii (``{prefix}/{method}/radii``) through :func:`~lightning_robust.utils.log_image`.

    Radii from the model's own scale: with ``radii=None`` (the default) the first evaluation sets the radii
    to the quartiles :data:`AUTO_RADII_QUANTILES` of the certified radii of its correctly classified samples
    (two significant digits), and keeps them for the rest of the run (and in the checkpoint), so the curve
    is neither all zeros nor all ones and successive epochs are comparable.

    All values are reduced over processes, so every rank logs the same numbers. Works with any module
    whose net is piecewise linear (ReLU, max/avg pooling, eval-mode BatchNorm, residual additions, ...);
    ``setup`` certifies one input of the evaluation data, so a network with e.g. softplus fails before the
    first training step with a ``NotPiecewiseLinearError`` naming the layer.

    Args:
        method: ``"simplex"`` (closed form), ``"decision_boundary"`` or ``"lipschitz"`` (baseline).
        radii: radii at which to report certified accuracy (``None``: from the first evaluation, see above).
        every_n_epochs: during fit, certify after epochs ``n-1, 2n-1, ...`` (0: never during fit).
        num_samples: number of inputs to certify (over all processes). The default, 6, keeps one
            evaluation within about a quarter of a training epoch of the 8x8-digits SmallCNN (a simplex
            certificate costs about one forward pass per input dimension per sample; see
            ``benchmarks/bench_callback_cost.py``); raise it for a final evaluation in ``trainer.test``.
        net: dotted path of the network inside the LightningModule (e.g. ``"net"``, ``"model.backbone"``);
            default: the module's ``net`` attribute if it is an ``nn.Module``, else the LightningModule
            itself (its ``forward`` must map inputs to logits).
        chunk_size: memory knob of the certificate (tangent rows per pass).
        batch_size: inputs certified per call.
        log_histogram: also log the histogram figure.
        prefix: first component of the logged names.
        prog_bar: show the numbers in the progress bar.
        max_samples: deprecated name of ``num_samples``.

    Raises:
        ValueError: on an unknown ``method`` or invalid numbers; when the run starts, on a ``net`` that is not a
            submodule.

    Example:
        >>> trainer = pl.Trainer(callbacks=[CertificationCallback("simplex", num_samples=128)])
        >>> trainer.test(model, datamodule=dm)[0]["cert/simplex/mean_radius"]
    """

    def __init__(
        self,
        method: str = "simplex",
        radii: Sequence[float] | None = None,
        every_n_epochs: int = 1,
        num_samples: int = 6,
        net: str | None = None,
        chunk_size: int = 4096,
        batch_size: int = 256,
        log_histogram: bool = True,
        prefix: str = "cert",
        prog_bar: bool = False,
        max_samples: int | None = None,
    ) -> None:
        num_samples = renamed_argument("CertificationCallback", "max_samples", max_samples, "num_samples",
                                       num_samples, 6)
        super().__init__(every_n_epochs=every_n_epochs, prefix=prefix, net=net, num_samples=num_samples,
                         prog_bar=prog_bar)
        check_choice("method", method, CERTIFICATE_METHODS)
        if radii is not None:
            radii = list(radii)
            if not radii:
                raise ValueError("radii must hold at least one radius (or be None: chosen from the model's scale), "
                                 "got an empty sequence")
            for i, r in enumerate(radii):
                check_non_negative(f"radii[{i}]", r)
        check_positive_int("chunk_size", chunk_size)
        check_positive_int("batch_size", batch_size)
        self.method = method
        self.radii: list[float] | None = None if radii is None else [float(r) for r in radii]
        self.chunk_size, self.batch_size = chunk_size, batch_size
        self.log_histogram = bool(log_histogram)
        self.last_results: dict[str, float] = {}

    @property
    def max_samples(self) -> int:
        """Deprecated alias of :attr:`num_samples`."""
        assert self.num_samples is not None
        return self.num_samples

    # ---- helpers ----
    def resolve_net(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.net is None:
            net = getattr(pl_module, "net", None)
            return net if isinstance(net, nn.Module) else pl_module
        return super().resolve_net(pl_module)

    def _name(self, what: str) -> str:
        return f"{self.method}/{what}"

    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        net = self.resolve_net(pl_module)
        batch = self.peek_batch(trainer, stage)
        if batch is None:
            return
        x = split_batch(batch).x
        if torch.is_tensor(x) and x.is_floating_point() and len(x):
            # One input through the certificate: a non-piecewise-linear layer fails here, not after an epoch.
            with torch.no_grad():
                certify(net, x[:1].to(next(net.parameters(), x).device), None, self.method,
                        chunk_size=self.chunk_size)

    # ---- evaluation ----
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 data: tuple[torch.Tensor, torch.Tensor] | None, stage: str) -> None:
        device = pl_module.device
        net = self.resolve_net(pl_module)
        # Evaluation runs under inference mode; certificates need autograd-capable tensors.
        with torch.inference_mode(False), torch.no_grad():
            if data is not None:
                x, y = data[0].to(device), data[1].to(device)
                radius = torch.cat([certify(net, xb, None, self.method, chunk_size=self.chunk_size)
                                    for xb in x.split(self.batch_size)])
                was = net.training
                net.eval()
                preds = net(x).argmax(1)
                net.train(was)
            else:
                radius = torch.zeros(0, device=device)
                preds = y = torch.zeros(0, dtype=torch.long, device=device)
            gathered = self._gather(trainer, pl_module, radius, preds == y)
            if self.radii is None:
                self.radii = self._auto_radii(gathered)
            metric = CertifiedAccuracy(self.radii).to(device)
            metric.update(radius, preds, y)
            acc = metric.compute()
            finite = torch.isfinite(radius)
            total = torch.stack([radius[finite].double().sum(), finite.sum().double()])
            total = trainer.strategy.reduce(total, reduce_op="sum")
            mean = float(total[0] / total[1]) if float(total[1]) else float("nan")
            results = {self._name("mean_radius"): mean}
            for r, a in zip(self.radii, acc.reshape(-1).tolist()):
                results[self._name(f"acc@{r:g}")] = float(a)
            self.last_results = {f"{self.prefix}/{k}": v for k, v in results.items()}
            self.log_metrics(pl_module, results, batch_size=int(total[1]))
            if self.log_histogram and trainer.is_global_zero and gathered[0].numel():
                img = histogram({self.method: gathered[0].cpu()}, bins=25, title=f"{self.method} certificates "
                                f"({stage}, epoch {trainer.current_epoch})", xlabel="certified L2 radius")
                log_image(trainer, f"{self.prefix}/{self._name('radii')}", img)

    def _gather(self, trainer: pl.Trainer, pl_module: pl.LightningModule, radius: torch.Tensor,
                correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All processes' ``(radii, correct)``, the same on every rank."""
        quota = self._quota(trainer)
        padded = torch.full((2, quota), float("nan"), dtype=torch.float64, device=radius.device)
        padded[0, : radius.numel()] = radius.double()
        padded[1, : radius.numel()] = correct.double()
        gathered = pl_module.all_gather(padded)
        assert isinstance(gathered, torch.Tensor)
        flat = gathered.reshape(-1, 2, quota).transpose(0, 1).reshape(2, -1)
        keep = ~torch.isnan(flat[0])
        return flat[0][keep], flat[1][keep] > 0.5

    def _auto_radii(self, gathered: tuple[torch.Tensor, torch.Tensor]) -> list[float]:
        radius, correct = gathered
        r = radius[correct & torch.isfinite(radius) & (radius > 0)]
        if r.numel() == 0:
            rank_zero_warn("CertificationCallback: no correctly classified sample has a positive certified radius "
                           "in the first evaluation; reporting acc@0 only (pass radii=... to choose them)")
            return [0.0]
        qs = torch.quantile(r, torch.tensor(AUTO_RADII_QUANTILES, dtype=r.dtype, device=r.device)).tolist()
        return sorted({_round2(q) for q in qs if _round2(q) > 0})

    # ---- state ----
    @property
    def state_key(self) -> str:
        # Several instances (e.g. one per method) can live in one Trainer and each keep its own state.
        return self._generate_state_key(method=self.method, prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        return {"last_results": dict(self.last_results), "radii": self.radii}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_results = dict(state_dict.get("last_results", {}))
        radii = state_dict.get("radii")
        if radii is not None and self.radii is None:
            self.radii = [float(r) for r in radii]
