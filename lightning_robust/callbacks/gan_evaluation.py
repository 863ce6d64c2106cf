"""FID / KID / Inception Score of a GAN during training, with an offline feature network, DDP-exact."""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_robust.callbacks.evaluation_callback import EvaluationCallback
from lightning_robust.metrics.image_quality import ClassifierFeatures, PrecomputedFeatures
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.checkpoint import load_module
from lightning_robust.utils.validation import check_choice, check_positive_int, check_seed

__all__ = ["GANEvaluation"]


def _latent_shape(pl_module: pl.LightningModule) -> tuple[int, ...]:
    fixed = getattr(pl_module, "fixed_latents", None)
    if torch.is_tensor(fixed):
        return tuple(fixed.shape[1:])
    dim = getattr(pl_module, "latent_dim", None)
    if isinstance(dim, int):
        return (dim, *tuple(getattr(pl_module, "latent_shape", ())))
    raise TypeError(f"{type(pl_module).__name__} has neither `fixed_latents` nor an integer `latent_dim`: "
                    "GANEvaluation cannot draw latents for it")


class GANEvaluation(EvaluationCallback):
    """Log FID, KID and Inception Score of the module's generator during fit, in validate and in test.

    During fit it evaluates at the end of training epochs ``n-1, 2n-1, ...`` (``every_n_epochs=n``; 0: never
    during fit); ``trainer.validate`` and ``trainer.test`` evaluate at the end of their loop, so the values
    are in the dicts they return. ``setup`` checks (before the first step) that the module can draw latents
    and that the datamodule has the ``real_split`` loader.

    The feature network is a classifier trained on the same data (Inception-v3 weights are not available
    offline), so the metrics are logged as ``<prefix>/fid_<feature_name>``, ``<prefix>/kid_<feature_name>``
    and ``<prefix>/is_<feature_name>`` to keep scores from different feature nets apart.

    Real images come from ``trainer.datamodule.<real_split>_dataloader()``; fakes from the module's
    ``sample(z=..., use_ema=...)`` (any :class:`~lightning_robust.models.GAN`; other modules are called as
    ``module(z)``) on a fixed latent set drawn from ``seed``, so successive epochs are scored on the same
    latents. Under DDP each rank scores every ``world_size``-th real image and latent; torchmetrics sums
    the Gaussian statistics (and gathers the KID/IS features) across ranks, so the logged values equal a
    1-process run on the same data, up to floating-point summation order. Real statistics are computed
    once and reused.

    Args:
        feature_net: the classifier (architecture; pretrained unless ``feature_checkpoint`` is given).
        feature_layer: dotted name of the FID / KID feature layer (SmallCNN: ``"classifier.3"``).
        feature_checkpoint: weights-only checkpoint of ``feature_net`` (state dict or Lightning checkpoint of
            a :class:`~lightning_robust.models.Classifier`).
        feature_name: the feature network's name in the metric names, e.g. ``"smallcnn_digits"``; defaults to
            the class name in lower case.
        input_size, in_channels: the classifier's input geometry when it has no ``input_size`` /
            ``in_channels`` attributes (generated images are resized / converted to it).
        real_split: ``"val"``, ``"train"`` or ``"test"``.
        max_real: use at most this many real images (``None``: the whole split).
        num_fake: number of generated images (``None``: as many as real images).
        kid: also log KID (``kid_subsets`` subsets of ``kid_subset_size``, capped at the sample counts).
        inception_score: also log the Inception Score from the classifier's logits (``is_splits`` splits).
        every_n_epochs: during fit, evaluate after training epochs ``n-1, 2n-1, ...`` (0: never during fit).
        use_ema: score the EMA generator when the module keeps one.
        batch_size: generation / feature batch size.
        seed: seed of the latents and of KID's / IS's random subsets.
        prefix: metric name prefix.
        prog_bar: show the numbers in the progress bar.

    Raises:
        ValueError: on invalid numbers or split names, or a missing feature layer.

    Example:
        >>> cb = GANEvaluation(SmallCNN(1, 10, 8), feature_checkpoint="clf.ckpt", feature_name="smallcnn_digits")
        >>> pl.Trainer(callbacks=[cb]).fit(gan, datamodule=DigitsDataModule(image_size=16))
    """

    def __init__(
        self,
        feature_net: nn.Module,
        feature_layer: str | None = "classifier.3",
        feature_checkpoint: str | os.PathLike | None = None,
        feature_name: str | None = None,
        input_size: int | None = None,
        in_channels: int | None = None,
        real_split: str = "val",
        max_real: int | None = None,
        num_fake: int | None = None,
        kid: bool = True,
        kid_subsets: int = 10,
        kid_subset_size: int = 100,
        inception_score: bool = True,
        is_splits: int = 10,
        every_n_epochs: int = 1,
        use_ema: bool = True,
        batch_size: int = 256,
        seed: int = 0,
        prefix: str = "val",
        prog_bar: bool = False,
    ) -> None:
        super().__init__(every_n_epochs=every_n_epochs, prefix=prefix, net=None, num_samples=None,
                         prog_bar=prog_bar)
        check_seed("seed", seed)
        check_choice("real_split", real_split, ("val", "train", "test"))
        for name, value in (("kid_subsets", kid_subsets), ("kid_subset_size", kid_subset_size),
                            ("is_splits", is_splits), ("batch_size", batch_size)):
            check_positive_int(name, value)
        for name, opt in (("max_real", max_real), ("num_fake", num_fake)):
            if opt is not None:
                check_positive_int(name, opt, minimum=2)
        if feature_checkpoint is not None:
            feature_net = load_module(feature_checkpoint, into=feature_net)
        self.features = ClassifierFeatures(feature_net, feature_layer, input_size, in_channels)
        self.logits = (ClassifierFeatures(feature_net, None, input_size, in_channels)
                       if inception_score else None)
        self.feature_name = feature_name or type(feature_net).__name__.lower()
        self.real_split, self.max_real, self.num_fake = real_split, max_real, num_fake
        self.kid_subsets, self.kid_subset_size, self.is_splits = kid_subsets, kid_subset_size, is_splits
        self.use_kid = kid
        self.use_ema, self.batch_size = use_ema, batch_size
        self.seed = seed
        self.fid: FrechetInceptionDistance | None = None
        self.kid: KernelInceptionDistance | None = None
        self.inception: InceptionScore | None = None
        self._n_real = 0  # global count of real images in the cached statistics (0: not computed yet)
        self.last: dict[str, float] = {}

    def metric_names(self) -> dict[str, str]:
        """``{"fid": "val/fid_<name>", ...}`` for the metrics this callback logs."""
        names = {"fid": f"{self.prefix}/fid_{self.feature_name}"}
        if self.use_kid:
            names["kid"] = f"{self.prefix}/kid_{self.feature_name}"
        if self.logits is not None:
            names["is"] = f"{self.prefix}/is_{self.feature_name}"
        return names

    # ---- lifecycle -------------------------------------------------------------------------------------
    def _build(self, device: torch.device) -> None:
        if self.fid is not None:
            if self.fid.device != torch.device(device):
                # The module moved (e.g. trainer.test on a GPU after a CPU fit): the feature nets and the
                # metrics' accumulated real statistics follow it.
                self.features.to(device)
                self.fid.to(device)
                if self.kid is not None:
                    self.kid.to(device)
                if self.logits is not None and self.inception is not None:
                    self.logits.to(device)
                    self.inception.to(device)
            return
        # The metrics receive features computed once per batch (FID and KID share them).
        self.features.to(device)
        same = PrecomputedFeatures(self.features.num_features)
        self.fid = FrechetInceptionDistance(feature=same, reset_real_features=False).to(device)
        if self.use_kid:
            self.kid = KernelInceptionDistance(feature=same, subsets=self.kid_subsets,
                                               subset_size=self.kid_subset_size,
                                               reset_real_features=False).to(device)
        if self.logits is not None:
            self.logits.to(device)
            self.inception = InceptionScore(feature=PrecomputedFeatures(self.logits.num_features),
                                            splits=self.is_splits).to(device)

    uses_subset = False
    fit_hook = "train"

    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _latent_shape(pl_module)  # TypeError naming what the module lacks
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not callable(getattr(dm, f"{self.real_split}_dataloader", None)):
            raise ValueError(f"GANEvaluation reads real images from trainer.datamodule.{self.real_split}_dataloader() "
                             f"(real_split={self.real_split!r}); run the Trainer with a datamodule that has one, or "
                             "set real_split to a split it has")
        self._build(pl_module.device)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule,  # type: ignore[override]
                 data: tuple[torch.Tensor, torch.Tensor] | None = None, stage: str = "fit") -> dict[str, float]:
        """Score the module's generator now; every rank must call this (it synchronises). Returns the values."""
        values = self.score(trainer, pl_module)
        names = self.metric_names()
        prefix = f"{self.prefix}/"
        logged = {names[k][len(prefix):]: v for k, v in values.items() if k in names}
        self.log_metrics(pl_module, logged, batch_size=self.num_fake or self._n_real)
        return values

    # ---- the evaluation --------------------------------------------------------------------------------
    def _real_loader(self, trainer: pl.Trainer) -> Any:
        dm = getattr(trainer, "datamodule", None)
        fn = getattr(dm, f"{self.real_split}_dataloader", None)
        if dm is None or fn is None:
            raise RuntimeError("GANEvaluation reads real images from "
                               f"trainer.datamodule.{self.real_split}_dataloader(); fit with a datamodule that has one")
        return fn()

    def _update_real(self, trainer: pl.Trainer, device: torch.device, rank: int, world: int) -> None:
        assert self.fid is not None
        seen = 0
        for batch in self._real_loader(trainer):
            x = batch if torch.is_tensor(batch) else split_batch(batch).x
            if self.max_real is not None:
                x = x[: max(0, self.max_real - seen)]
            # global position p of each image in the split; this rank scores p % world == rank
            pos = torch.arange(seen, seen + len(x))
            mine = x[(pos % world == rank).nonzero().flatten()]
            seen += len(x)
            if len(mine):
                feats = self.features(mine.to(device))
                self.fid.update(feats, real=True)
                if self.kid is not None:
                    self.kid.update(feats, real=True)
            if self.max_real is not None and seen >= self.max_real:
                break
        self._n_real = seen

    @torch.no_grad()
    def _update_fake(self, pl_module: pl.LightningModule, n_fake: int, rank: int, world: int) -> None:
        assert self.fid is not None
        g = torch.Generator().manual_seed(self.seed)
        z_all = torch.randn(n_fake, *_latent_shape(pl_module), generator=g)
        z_mine = z_all[rank::world]
        sample = getattr(pl_module, "sample", None)
        was_training = pl_module.training
        for zb in z_mine.split(self.batch_size):
            zb = zb.to(pl_module.device)
            if callable(sample):
                fake = sample(z=zb, use_ema=self.use_ema)
            else:
                pl_module.eval()
                fake = pl_module(zb)
            feats = self.features(fake)
            self.fid.update(feats, real=False)
            if self.kid is not None:
                self.kid.update(feats, real=False)
            if self.inception is not None and self.logits is not None:
                self.inception.update(self.logits(fake))
        pl_module.train(was_training)

    def score(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """FID / KID / IS of the module's generator now; every rank must call this (it synchronises)."""
        self._build(pl_module.device)
        assert self.fid is not None
        rank, world = trainer.global_rank, trainer.world_size
        if self._n_real == 0:
            self._update_real(trainer, pl_module.device, rank, world)
        n_fake = self.num_fake or self._n_real
        if self._n_real < 2:
            raise RuntimeError(f"GANEvaluation needs at least 2 real images, the {self.real_split} split has "
                               f"{self._n_real}")
        self._update_fake(pl_module, n_fake, rank, world)
        out: dict[str, float] = {}
        # The same seed on every rank: KID / IS draw their random subsets identically everywhere.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            out["fid"] = float(self.fid.compute())
            if self.kid is not None:
                self.kid.subset_size = min(self.kid_subset_size, self._n_real, n_fake)
                kid_mean, kid_std = self.kid.compute()
                out.update(kid=float(kid_mean), kid_std=float(kid_std))
            if self.inception is not None:
                is_mean, is_std = self.inception.compute()
                out.update({"is": float(is_mean), "is_std": float(is_std)})
        # reset() keeps the real statistics (reset_real_features=False) and drops the fakes.
        self.fid.reset()
        if self.kid is not None:
            self.kid.reset()
        if self.inception is not None:
            self.inception.reset()
        self.last = out
        return out
