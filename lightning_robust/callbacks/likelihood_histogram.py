"""Log the histogram of per-sample log-likelihoods of validation data, beside out-of-distribution variants."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch

from lightning_robust.callbacks.evaluation_callback import EvaluationCallback, renamed_argument
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


class LikelihoodHistogram(EvaluationCallback):
    """Score evaluation samples with the module's log-likelihood and log their histogram (and OOD ones').

    Works with any LightningModule that has a scoring method ``module.<method>(x) -> [B]`` (higher = more
    likely), such as :meth:`lightning_robust.models.EntropicGAN.log_likelihood` (the lower bound of Balaji
    et al., arXiv 1810.04147). If ``validation_step`` / ``test_step`` already returns
    ``{output_key: scores}``, those are used instead of scoring again. Out-of-distribution variants of each
    batch (:func:`make_ood`) are scored too, and the callback logs per set ``{prefix}/mean_<set>``, the
    ID-vs-OOD ``{prefix}/auroc_<kind>`` and a histogram ``{prefix}/histogram``
    (:func:`~lightning_robust.utils.log_image`), in validation during fit (after epochs ``n-1, 2n-1, ...``),
    in ``trainer.validate`` and in ``trainer.test``. Under DDP, scores are gathered from all ranks, so
    every rank logs the same numbers. ``setup`` checks that ``method`` exists before the first step.

    Args:
        method: name of the module's scoring method.
        output_key: key of the scores in ``validation_step``'s returned dict, if any.
        ood: kinds of synthetic OOD inputs, from :data:`OOD_KINDS` (may be empty).
        num_samples: samples scored per epoch over all processes (the first batches of each process).
        bins: histogram bins.
        every_n_epochs: during fit, run after epochs ``n-1, 2n-1, ...`` (0: never during fit).
        prefix: prefix of the logged names.
        seed: seed of the OOD noise (keyed by epoch, batch and rank, so runs are reproducible).
        prog_bar: show the numbers in the progress bar.
        tag: deprecated name of ``prefix``.
        max_samples: deprecated; was the per-process count, now ``num_samples`` counts over all processes.

    Attributes:
        scores: the last epoch's gathered scores per set (``"in-distribution"`` and each OOD kind).

    Raises:
        ValueError: on unknown OOD kinds or non-positive sizes; when the run starts, on a module without ``method``.

    Example:
        >>> trainer = pl.Trainer(callbacks=[LikelihoodHistogram(ood=("uniform", "shuffled"))])
        >>> trainer.fit(EntropicGAN(...), datamodule=dm)
    """

    uses_subset = False

    def __init__(self, method: str = "log_likelihood", output_key: str = "log_likelihood",
                 ood: Sequence[str] = ("uniform", "shuffled"), num_samples: int = 1024, bins: int = 40,
                 every_n_epochs: int = 1, prefix: str = "likelihood", seed: int = 0, prog_bar: bool = False,
                 tag: str | None = None, max_samples: int | None = None) -> None:
        prefix = renamed_argument("LikelihoodHistogram", "tag", tag, "prefix", prefix, "likelihood")
        num_samples = renamed_argument("LikelihoodHistogram", "max_samples", max_samples, "num_samples",
                                       num_samples, 1024)
        super().__init__(every_n_epochs=every_n_epochs, prefix=prefix, net=None, num_samples=num_samples,
                         prog_bar=prog_bar)
        check_seed("seed", seed)
        if not isinstance(method, str) or not method:
            raise TypeError(f"method must be the name (a string) of the module's scoring method, got {method!r}")
        for i, kind in enumerate(ood):
            check_choice(f"ood[{i}]", kind, OOD_KINDS)
        check_positive_int("bins", bins)
        self.method, self.output_key, self.ood = method, output_key, tuple(ood)
        self.bins, self.seed = bins, seed
        self.scores: dict[str, torch.Tensor] = {}
        self.last_means: dict[str, float] = {}
        self._buffers: dict[str, list[torch.Tensor]] = {}
        self._seen = 0

    @property
    def tag(self) -> str:
        """Deprecated alias of :attr:`prefix`."""
        return self.prefix

    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, self.method, None)):
            raise ValueError(f"LikelihoodHistogram: method={self.method!r} is not a method of "
                             f"{type(pl_module).__name__}; set `method` to the module's scoring method "
                             "(x -> per-sample log-likelihood [B])")

    def _score(self, pl_module: pl.LightningModule, x: torch.Tensor) -> torch.Tensor:
        fn = getattr(pl_module, self.method)
        with torch.no_grad():
            return fn(x).detach().reshape(x.shape[0]).double()

    def on_eval_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._buffers = {name: [] for name in ("in-distribution", *self.ood)}
        self._seen = 0

    def on_eval_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, stage: str) -> None:
        quota = self._quota(trainer)
        if self._seen >= quota:
            return
        x = batch if torch.is_tensor(batch) else split_batch(batch).x
        x = x[: quota - self._seen]
        self._seen += x.shape[0]
        given = outputs.get(self.output_key) if isinstance(outputs, dict) else None
        scores = given.detach()[: x.shape[0]].double() if torch.is_tensor(given) else self._score(pl_module, x)
        self._buffers["in-distribution"].append(scores)
        for i, kind in enumerate(self.ood):
            g = torch.Generator().manual_seed(self.seed + 1_000_003 * trainer.current_epoch + 1009 * batch_idx
                                              + 17 * trainer.global_rank + i)
            self._buffers[kind].append(self._score(pl_module, make_ood(x, kind, g)))

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 data: tuple[torch.Tensor, torch.Tensor] | None, stage: str) -> None:
        if not self._buffers.get("in-distribution"):
            return
        gathered: dict[str, torch.Tensor] = {}
        for name, parts in self._buffers.items():
            local = torch.cat(parts).to(pl_module.device)
            if trainer.world_size > 1:  # equal lengths: DistributedSampler pads every rank to the same size
                local = trainer.strategy.all_gather(local).reshape(-1)
            gathered[name] = local.cpu()
        self.scores = gathered
        self.last_means = {name: float(v.mean()) for name, v in gathered.items()}
        values = {f"mean_{name}": mean for name, mean in self.last_means.items()}
        for kind in self.ood:
            values[f"auroc_{kind}"] = rank_auroc(gathered["in-distribution"], gathered[kind])
        self.log_metrics(pl_module, values, batch_size=gathered["in-distribution"].numel())
        image = histogram(gathered, bins=self.bins, title=f"{self.method} ({stage}, epoch {trainer.current_epoch})",
                          xlabel="log-likelihood score", ylabel="samples")
        log_image(trainer, f"{self.prefix}/histogram", image)

    def state_dict(self) -> dict[str, Any]:
        return {"last_means": dict(self.last_means)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_means = dict(state_dict.get("last_means", {}))
