"""Log certified robustness (Singla & Feizi, arXiv 1902.01235) of any LightningModule's ReLU net."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_robust.certify import CERTIFICATE_METHODS, certify
from lightning_robust.metrics import CertifiedAccuracy
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.image_logging import log_image
from lightning_robust.utils.plotting import histogram
from lightning_robust.utils.validation import check_choice, check_non_negative, check_positive_int

__all__ = ["CertificationCallback"]


class CertificationCallback(pl.Callback):
    """Certify the first validation samples every ``every_n_epochs`` epochs and log the results.

    At the end of a validation epoch, the callback computes the certified L2 radius of the predicted class
    (:func:`~lightning_robust.certify.certify` with ``method``) for the first ``max_samples`` validation
    samples (split evenly across processes: with the default, unshuffled distributed sampler the union is
    the same set as in a 1-process run), and logs

    * ``{prefix}/{method}/mean_radius``: mean certified radius over those samples;
    * ``{prefix}/{method}/acc@{eps}``: certified accuracy at each radius in ``radii`` (correct and certified
      beyond ``eps``; ``acc@0`` is the clean accuracy), via :class:`~lightning_robust.metrics.CertifiedAccuracy`;
    * a histogram of the radii (``{prefix}/{method}/radii``) through :func:`~lightning_robust.utils.log_image`.

    All values are reduced over processes, so every rank logs the same numbers. Works with any
    LightningModule whose net is piecewise linear (ReLU, max/avg pooling, eval-mode BatchNorm, residual
    additions, ...); a network with e.g. softplus raises a ``NotPiecewiseLinearError`` naming the layer.

    Args:
        method: ``"simplex"`` (closed form), ``"decision_boundary"`` or ``"lipschitz"`` (baseline).
        radii: radii at which to report certified accuracy.
        every_n_epochs: certify after every n-th validation epoch (skipped during the sanity check).
        max_samples: number of validation samples to certify (over all processes).
        net: dotted path of the network inside the LightningModule (e.g. ``"net"``, ``"model.backbone"``);
            default: the module's ``net`` attribute if it is an ``nn.Module``, else the LightningModule
            itself (its ``forward`` must map inputs to logits).
        chunk_size: memory knob of the certificate (tangent rows per pass).
        log_histogram: also log the histogram figure.
        prefix: first component of the logged names.

    Raises:
        ValueError: on an unknown ``method`` or invalid numbers.

    Example:
        >>> trainer = pl.Trainer(callbacks=[CertificationCallback("simplex", radii=(0.0, 0.1), max_samples=128)])
    """

    def __init__(
        self,
        method: str = "simplex",
        radii: Sequence[float] = (0.0, 0.05, 0.1, 0.25),
        every_n_epochs: int = 1,
        max_samples: int = 256,
        net: str | None = None,
        chunk_size: int = 4096,
        log_histogram: bool = True,
        prefix: str = "cert",
    ) -> None:
        super().__init__()
        check_choice("method", method, CERTIFICATE_METHODS)
        radii = list(radii)
        if not radii:
            raise ValueError("radii must hold at least one radius, got an empty sequence")
        for i, r in enumerate(radii):
            check_non_negative(f"radii[{i}]", r)
        check_positive_int("every_n_epochs", every_n_epochs)
        check_positive_int("max_samples", max_samples)
        check_positive_int("chunk_size", chunk_size)
        if net is not None and (not isinstance(net, str) or not net):
            raise ValueError(f"net must be a dotted attribute path such as 'net', got {net!r}")
        self.method, self.radii, self.every_n_epochs = method, [float(r) for r in radii], every_n_epochs
        self.max_samples, self.net_path, self.chunk_size = max_samples, net, chunk_size
        self.log_histogram, self.prefix = log_histogram, prefix
        self._xs: list[torch.Tensor] = []
        self._ys: list[torch.Tensor] = []
        self._collecting = False
        self.last_results: dict[str, float] = {}

    # ---- helpers ----
    def _due(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _quota(self, trainer: pl.Trainer) -> int:
        return math.ceil(self.max_samples / max(1, trainer.world_size))

    def _resolve_net(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.net_path is None:
            net = getattr(pl_module, "net", None)
            return net if isinstance(net, nn.Module) else pl_module
        try:
            return pl_module.get_submodule(self.net_path)
        except AttributeError as err:
            raise ValueError(f"net={self.net_path!r} does not name a submodule of {type(pl_module).__name__}: "
                             f"{err}") from err

    def _name(self, what: str) -> str:
        return f"{self.prefix}/{self.method}/{what}"

    # ---- hooks ----
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._xs, self._ys = [], []
        self._collecting = self._due(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._collecting or dataloader_idx != 0:
            return
        have = sum(len(x) for x in self._xs)
        need = self._quota(trainer) - have
        if need <= 0:
            return
        x, y, _ = split_batch(batch)
        self._xs.append(x[:need].detach())
        self._ys.append(y[:need].detach())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._collecting:
            return
        self._collecting = False
        device = pl_module.device
        net = self._resolve_net(pl_module)
        # Validation runs under inference mode; certificates need autograd-capable tensors.
        with torch.inference_mode(False), torch.no_grad():
            if self._xs:
                x = torch.cat(self._xs).to(device).clone()
                y = torch.cat(self._ys).to(device).clone()
                radius = certify(net, x, None, self.method, chunk_size=self.chunk_size)
                was = net.training
                net.eval()
                preds = net(x).argmax(1)
                net.train(was)
            else:
                radius = torch.zeros(0, device=device)
                preds = y = torch.zeros(0, dtype=torch.long, device=device)
            metric = CertifiedAccuracy(self.radii).to(device)
            metric.update(radius, preds, y)
            acc = metric.compute()
            finite = torch.isfinite(radius)
            total = torch.stack([radius[finite].double().sum(), finite.sum().double()])
            total = trainer.strategy.reduce(total, reduce_op="sum")
            mean = float(total[0] / total[1]) if float(total[1]) else float("nan")
            self.last_results = {self._name("mean_radius"): mean}
            for r, a in zip(self.radii, acc.reshape(-1).tolist()):
                self.last_results[self._name(f"acc@{r:g}")] = float(a)
            for name, value in self.last_results.items():
                # identical on every rank already; sync_dist just keeps Lightning's DDP checks quiet
                pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)
            if self.log_histogram:
                self._histogram(trainer, pl_module, radius)
        self._xs, self._ys = [], []

    def _histogram(self, trainer: pl.Trainer, pl_module: pl.LightningModule, radius: torch.Tensor) -> None:
        quota = self._quota(trainer)
        padded = torch.full((quota,), float("nan"), dtype=torch.float64, device=radius.device)
        padded[: radius.numel()] = radius.double()
        gathered = pl_module.all_gather(padded)
        assert isinstance(gathered, torch.Tensor)
        gathered = gathered.reshape(-1)
        values = gathered[~torch.isnan(gathered)].cpu()
        if trainer.is_global_zero and values.numel():
            img = histogram({self.method: values}, bins=25, title=f"{self.method} certificates (epoch "
                            f"{trainer.current_epoch})", xlabel="certified L2 radius")
            log_image(trainer, self._name("radii"), img)

    # ---- state ----
    @property
    def state_key(self) -> str:
        # Several instances (e.g. one per method) can live in one Trainer and each keep its own state.
        return self._generate_state_key(method=self.method, prefix=self.prefix, radii=tuple(self.radii))

    def state_dict(self) -> dict[str, Any]:
        return {"last_results": dict(self.last_results)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_results = dict(state_dict.get("last_results", {}))
