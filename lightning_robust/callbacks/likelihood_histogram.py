"""Log the histogram of per-sample log-likelihoods of validation data, beside out-of-distribution variants."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.image_logging import log_image
from lightning_robust.utils.plotting import histogram
from lightning_robust.utils.validation import check_choice, check_positive_int, check_seed

__all__ = ["OOD_KINDS", "LikelihoodHistogram", "make_ood", "rank_auroc"]

#: Synthetic out-of-distribution variants of a batch, made on the fly (no extra data set needed).
OOD_KINDS = ("gaussian", "shuffled", "uniform")


def make_ood(x: torch.Tensor, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """An out-of-distribution variant of the batch ``x`` ([B, ...]).

    ``"uniform"``: i.i.d. uniform values over the batch's range ``[min, max]`` (noise images);
    ``"shuffled"``: each sample's features in a random order (same pixel histogram, no structure);
    ``"gaussian"``: independent Gaussians with the batch's per-feature mean and standard deviation.
    """
    check_choice("kind", kind, OOD_KINDS)
    flat = x.reshape(x.shape[0], -1)
    if kind == "uniform":
        lo, hi = flat.min(), flat.max()
        u = torch.rand(flat.shape, generator=generator, dtype=flat.dtype).to(flat.device)
        out = lo + (hi - lo) * u
    elif kind == "shuffled":
        keys = torch.rand(flat.shape, generator=generator).to(flat.device)
        out = flat.gather(1, keys.argsort(dim=1))
    else:
        noise = torch.randn(flat.shape, generator=generator, dtype=flat.dtype).to(flat.device)
        std = flat.std(0, keepdim=True) if flat.shape[0] > 1 else torch.ones_like(flat[:1])
        out = flat.mean(0, keepdim=True) + std * noise
    return out.reshape(x.shape)


def rank_auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """``P(score_pos > score_neg) + ½ P(tie)`` (the Mann–Whitney form of the ROC AUC)."""
    pos, neg = positive.flatten().double(), negative.flatten().double()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    both = torch.cat([pos, neg])
    order = both.argsort()
    ranks = torch.empty_like(both)
    ranks[order] = torch.arange(1, both.numel() + 1, dtype=both.dtype)
    # Average the ranks of ties.
    uniq, inverse = torch.unique(both, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=both.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(uniq.numel(), dtype=both.dtype).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    u = ranks[: pos.numel()].sum() - pos.numel() * (pos.numel() + 1) / 2
    return float(u / (pos.numel() * neg.numel()))


class LikelihoodHistogram(pl.Callback):
    """Score validation samples with the module's log-likelihood and log their histogram (and OOD ones').

    Works with any LightningModule that has a scoring method ``module.<method>(x) -> [B]`` (higher = more
    likely), such as :meth:`lightning_robust.models.EntropicGAN.log_likelihood` (the lower bound of Balaji
    et al., arXiv 1810.04147). If ``validation_step`` already returns ``{output_key: scores}``, those are
    used instead of scoring again. Out-of-distribution variants of each batch (:func:`make_ood`) are scored
    too, and the callback logs per set ``<tag>/mean_<set>``, the ID-vs-OOD ``<tag>/auroc_<kind>`` and a PNG
    histogram ``<tag>/histogram`` (:func:`~lightning_robust.utils.log_image`). Under DDP, scores are
    gathered from all ranks, so every rank logs the same numbers.

    Args:
        method: name of the module's scoring method.
        output_key: key of the scores in ``validation_step``'s returned dict, if any.
        ood: kinds of synthetic OOD inputs, from :data:`OOD_KINDS` (may be empty).
        max_samples: validation samples scored per rank and epoch (the first batches).
        bins: histogram bins.
        every_n_epochs: run on every n-th validation epoch.
        tag: prefix of the logged names.
        seed: seed of the OOD noise (keyed by epoch, batch and rank, so runs are reproducible).

    Attributes:
        scores: the last epoch's gathered scores per set (``"in-distribution"`` and each OOD kind).

    Raises:
        ValueError: on unknown OOD kinds or non-positive sizes.

    Example:
        >>> trainer = pl.Trainer(callbacks=[LikelihoodHistogram(ood=("uniform", "shuffled"))])
        >>> trainer.fit(EntropicGAN(...), datamodule=dm)
    """

    def __init__(self, method: str = "log_likelihood", output_key: str = "log_likelihood",
                 ood: Sequence[str] = ("uniform", "shuffled"), max_samples: int = 1024, bins: int = 40,
                 every_n_epochs: int = 1, tag: str = "likelihood", seed: int = 0) -> None:
        check_seed("seed", seed)
        for i, kind in enumerate(ood):
            check_choice(f"ood[{i}]", kind, OOD_KINDS)
        check_positive_int("max_samples", max_samples)
        check_positive_int("bins", bins)
        check_positive_int("every_n_epochs", every_n_epochs)
        self.method, self.output_key, self.ood = method, output_key, tuple(ood)
        self.max_samples, self.bins, self.every_n_epochs = max_samples, bins, every_n_epochs
        self.tag, self.seed = tag, seed
        self.scores: dict[str, torch.Tensor] = {}
        self.last_means: dict[str, float] = {}
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._seen = 0

    def _due(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and trainer.current_epoch % self.every_n_epochs == 0

    def _score(self, pl_module: pl.LightningModule, x: torch.Tensor) -> torch.Tensor:
        fn = getattr(pl_module, self.method, None)
        if not callable(fn):
            raise AttributeError(f"LikelihoodHistogram needs {type(pl_module).__name__}.{self.method}(x) -> scores "
                                 f"[B]; set `method` to the module's scoring method")
        with torch.no_grad():
            return fn(x).detach().reshape(x.shape[0]).double()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._buffers = {name: [] for name in ("in-distribution", *self.ood)}
        self._seen = 0

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._due(trainer) or self._seen >= self.max_samples or dataloader_idx != 0:
            return
        x = batch if torch.is_tensor(batch) else split_batch(batch).x
        x = x[: self.max_samples - self._seen]
        self._seen += x.shape[0]
        given = outputs.get(self.output_key) if isinstance(outputs, dict) else None
        scores = given.detach()[: x.shape[0]].double() if torch.is_tensor(given) else self._score(pl_module, x)
        self._buffers["in-distribution"].append(scores)
        for i, kind in enumerate(self.ood):
            g = torch.Generator().manual_seed(self.seed + 1_000_003 * trainer.current_epoch + 1009 * batch_idx
                                              + 17 * trainer.global_rank + i)
            self._buffers[kind].append(self._score(pl_module, make_ood(x, kind, g)))

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._due(trainer) or not self._buffers.get("in-distribution"):
            return
        gathered: dict[str, torch.Tensor] = {}
        for name, parts in self._buffers.items():
            local = torch.cat(parts).to(pl_module.device)
            if trainer.world_size > 1:  # equal lengths: DistributedSampler pads every rank to the same size
                local = trainer.strategy.all_gather(local).reshape(-1)
            gathered[name] = local.cpu()
        self.scores = gathered
        self.last_means = {name: float(v.mean()) for name, v in gathered.items()}
        for name, mean in self.last_means.items():
            pl_module.log(f"{self.tag}/mean_{name}", mean, sync_dist=True)  # equal on all ranks
        for kind in self.ood:
            pl_module.log(f"{self.tag}/auroc_{kind}", rank_auroc(gathered["in-distribution"], gathered[kind]),
                          sync_dist=True)
        image = histogram(gathered, bins=self.bins, title=f"{self.method} (epoch {trainer.current_epoch})",
                          xlabel="log-likelihood score", ylabel="samples")
        log_image(trainer, f"{self.tag}/histogram", image)

    def state_dict(self) -> dict[str, Any]:
        return {"last_means": dict(self.last_means)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_means = dict(state_dict.get("last_means", {}))
