"""Remove suspected poisons from the training set during ``Trainer.fit`` (Deep k-NN defence, arXiv 1909.13374)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_robust.datamodules.base import RobustDataModule
from lightning_robust.defenses import (
    CLASS_BALANCES,
    TIE_BREAKS,
    deep_knn_filter,
    default_k,
    l2_outlier_filter,
    one_class_svm_filter,
    random_eviction,
)
from lightning_robust.metrics.poison_detection import poison_detection_scores
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.feature_extractor import FeatureExtractor
from lightning_robust.utils.modules import model_mode, resolve_layer
from lightning_robust.utils.validation import (
    check_choice,
    check_fraction,
    check_positive,
    check_positive_int,
    check_seed,
)

__all__ = ["FILTER_METHODS", "DeepKNNPoisonFilter"]

FILTER_METHODS = ("deep_knn", "l2_outlier", "one_class_svm", "random")


class DeepKNNPoisonFilter(pl.Callback):
    """Filter the training set of any LightningModule with the Deep k-NN defence (Peri et al.,
    arXiv 1909.13374) or one of its baselines, then train on the kept samples only.

    At the start of epoch ``filter_epoch`` (``0``: before any training, e.g. with a pretrained feature
    extractor as in the paper's transfer-learning setting) the callback

    1. extracts features of the whole training set: the output of layer ``layer`` of the LightningModule
       (a dotted name such as ``"net.classifier.3"``), or of ``feature_extractor`` when given (optionally
       at its own ``layer``); in eval mode, without gradients, each process a contiguous share;
    2. gathers all features on every process and takes one decision: Deep k-NN removes a sample whose
       label is not the plurality label of its ``k`` nearest neighbours (each process votes for a block of
       samples and the blocks are gathered), the baselines are computed on rank 0 and broadcast;
    3. drops the removed samples with :meth:`RobustDataModule.exclude_train_indices
       <lightning_robust.datamodules.RobustDataModule.exclude_train_indices>` of ``trainer.datamodule``,
       the one place that holds (and checkpoints) excluded samples; the next train dataloader no longer
       yields them;
    4. logs the number removed (``poison_filter/num_removed``, ``poison_filter/num_examples``, through
       ``LightningModule.log`` with ``sync_dist``, so they can be monitored) and writes the removed
       positions to ``output_file`` (JSON, rank 0). Its checkpoint state records that (and when) it decided,
       so a resumed run does not filter again; the DataModule's own state restores the kept set. When the
       DataModule knows its poisons (``poison_indices``), detection rate, precision, recall, F1 and MCC are
       logged and written too.

    Requirements, checked at ``setup`` with an error that says what to change: the Trainer trains from a
    :class:`~lightning_robust.datamodules.RobustDataModule` (``trainer.fit(model, datamodule=dm)``; wrap
    plain datasets in :class:`~lightning_robust.datamodules.DatasetDataModule`), and with
    ``filter_epoch > 0`` the Trainer rebuilds the train loader each epoch
    (``Trainer(reload_dataloaders_every_n_epochs=1)``). The callback never calls the DataModule's ``setup``
    and never changes Trainer settings.

    Positions are indices into ``RobustDataModule.train_dataset``. Features are computed with the dataset's
    own transforms: use a deterministic training transform, or pass test-time features through
    ``feature_extractor``.

    Args:
        k: neighbours of the Deep k-NN vote; ``None`` uses the paper's guideline, k about the number of
            training examples per class (``normalized_k`` times the mean class size).
        layer: dotted name of the feature layer (in ``feature_extractor`` if given, else in the
            LightningModule); ``None`` uses the module's output.
        method: ``"deep_knn"`` (default), or the baselines ``"l2_outlier"``, ``"one_class_svm"``, ``"random"``.
        filter_epoch: filter before this epoch trains (``0`` = before training starts).
        feature_extractor: optional separate network computing the features (e.g. a pretrained net).
        normalized_k: ``k / examples-per-class`` when ``k`` is ``None`` (paper: 1 to 2 works best).
        tie_break: Deep k-NN vote ties: ``"keep"`` (default), ``"remove"`` or ``"smallest"``.
        class_balance: ``"none"`` or ``"replicate"`` (the paper's remedy for class imbalance).
        fraction: share of each class removed by ``"l2_outlier"`` and ``"random"``.
        nu: the one-class SVM's ``nu``.
        batch_size: batch size of the feature pass.
        chunk_size: query rows per block of the k-NN (default: 256 MB of distances).
        output_file: JSON file for the removed positions (default ``<log_dir>/poison_filter.json``).
        seed: seed of ``"random"`` eviction.

    Raises:
        ValueError: on invalid arguments; at fit start, if ``layer`` does not exist; at filtering time, if
            ``k`` exceeds the number of other samples.

    Example:
        >>> trainer = pl.Trainer(callbacks=[DeepKNNPoisonFilter(layer="net.classifier.3", filter_epoch=0)])
        >>> trainer.fit(model, datamodule=PoisonedDataModule(...))
    """

    def __init__(
        self,
        k: int | None = None,
        layer: str | None = None,
        method: str = "deep_knn",
        filter_epoch: int = 0,
        feature_extractor: nn.Module | None = None,
        normalized_k: float = 1.0,
        tie_break: str = "keep",
        class_balance: str = "none",
        fraction: float = 0.05,
        nu: float = 0.05,
        batch_size: int = 256,
        chunk_size: int | None = None,
        output_file: str | None = None,
        seed: int = 0,
    ) -> None:
        check_seed("seed", seed)
        super().__init__()
        if k is not None:
            check_positive_int("k", k)
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"layer must be a dotted module name or None, got {layer!r}")
        self.method = check_choice("method", method, FILTER_METHODS)
        if not isinstance(filter_epoch, int) or isinstance(filter_epoch, bool) or filter_epoch < 0:
            raise ValueError(f"filter_epoch must be a non-negative integer, got {filter_epoch!r}")
        if feature_extractor is not None and not isinstance(feature_extractor, nn.Module):
            raise TypeError(f"feature_extractor must be an nn.Module, got {type(feature_extractor).__name__}")
        check_positive("normalized_k", normalized_k)
        check_choice("tie_break", tie_break, TIE_BREAKS)
        check_choice("class_balance", class_balance, CLASS_BALANCES)
        check_fraction("fraction", fraction)
        check_fraction("nu", nu, inclusive_low=False, inclusive_high=True)
        check_positive_int("batch_size", batch_size)
        if chunk_size is not None:
            check_positive_int("chunk_size", chunk_size)
        self.k, self.layer, self.filter_epoch = k, layer, filter_epoch
        self.feature_extractor = feature_extractor
        self.normalized_k, self.tie_break, self.class_balance = normalized_k, tie_break, class_balance
        self.fraction, self.nu, self.batch_size, self.chunk_size = fraction, nu, batch_size, chunk_size
        self.output_file, self.seed = output_file, seed
        # Decision state (checkpointed): None until the filter has run.
        self.removed_indices: list[int] | None = None  # this run's decision (None after a resume)
        self.num_removed: int | None = None
        self.num_examples: int = 0
        self.k_used: int | None = None
        self.filtered_before_epoch: int | None = None
        self.detection: dict[str, float] = {}
        self._pending_metrics: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        # Several filters may share a Trainer (e.g. a baseline after the k-NN filter): key the checkpoint
        # state by what defines the decision point, not by k, so a resumed run may change k freely.
        return self._generate_state_key(method=self.method, layer=self.layer, filter_epoch=self.filter_epoch)

    # ---- hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._datamodule(trainer)  # a clear error now rather than at filtering time
        if self.filter_epoch > 0 and not getattr(trainer, "reload_dataloaders_every_n_epochs", 0):
            # The loader of epoch `filter_epoch` must be built after the decision; only the Trainer's own
            # setting makes the fit loop request a new one.
            raise ValueError(f"DeepKNNPoisonFilter(filter_epoch={self.filter_epoch}) removes samples after "
                             "training has started: create the Trainer with reload_dataloaders_every_n_epochs=1 "
                             "so that the next train dataloader is built without them (or use filter_epoch=0)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The layer is checked here, not in `setup`: Lightning runs the callbacks' setup before the module's own
        # setup/configure_model, where a module may build its network lazily.
        if self.layer is not None:
            resolve_layer(self.feature_extractor or pl_module, self.layer)  # clear error naming valid layers
        # A resumed run has decided already (the DataModule's restored state holds the exclusions).
        if self.filtered_before_epoch is None and self.filter_epoch == 0:
            self.run_filter(trainer, pl_module, at_start=True)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A decision taken in on_fit_start could not be logged there (Lightning allows no logging in it).
        if self._pending_metrics:
            self._log(pl_module, self._pending_metrics)
            self._pending_metrics = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.filtered_before_epoch is None and trainer.current_epoch + 1 >= self.filter_epoch:
            self.run_filter(trainer, pl_module, at_start=False)

    # ---- the decision ----------------------------------------------------------------------------------
    def run_filter(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at_start: bool) -> list[int]:
        """Extract features, decide, exclude; returns the removed positions (identical on every rank)."""
        dm = self._datamodule(trainer)
        if dm.train_dataset is None:
            raise RuntimeError(f"DeepKNNPoisonFilter: {type(dm).__name__}.train_dataset is None at fit time; its "
                               "setup('fit') must build the training set (the Trainer calls setup before fitting)")
        excluded = set(dm.excluded_train_indices)
        positions = [i for i in range(len(dm.train_dataset)) if i not in excluded]  # type: ignore[arg-type]
        features, labels = self._features(trainer, pl_module, dm.train_dataset, positions)
        keep = self._decide(trainer, features, labels)
        removed = [positions[i] for i in (~keep).nonzero().flatten().tolist()]
        dm.exclude_train_indices(removed)
        self.removed_indices = sorted(removed)
        self.num_removed = len(removed)
        self.num_examples = len(positions)
        self.filtered_before_epoch = trainer.current_epoch + (0 if at_start else 1)
        self._report(trainer, pl_module, dm, positions, at_start)
        return self.removed_indices

    @staticmethod
    def _datamodule(trainer: pl.Trainer) -> RobustDataModule:
        dm = getattr(trainer, "datamodule", None)
        if not isinstance(dm, RobustDataModule):
            got = "no DataModule (dataloaders passed to `fit`)" if dm is None else f"a {type(dm).__name__}"
            raise TypeError(
                "DeepKNNPoisonFilter removes samples through trainer.datamodule, which must be a lightning_robust "
                f"RobustDataModule (e.g. PoisonedDataModule, or DatasetDataModule around your datasets); got {got}")
        return dm

    @torch.no_grad()
    def _features(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dataset: Dataset,
                  positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        n, world, rank = len(positions), trainer.world_size, trainer.global_rank
        per = math.ceil(n / world)
        mine = positions[rank * per: (rank + 1) * per]
        device = pl_module.device
        net = self.feature_extractor.to(device) if self.feature_extractor is not None else pl_module
        feats: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        loader = DataLoader(Subset(dataset, mine), batch_size=self.batch_size, shuffle=False)
        with model_mode(net, "eval"):
            for batch in loader:
                b = split_batch(batch)
                x = b.x.to(device)
                if self.layer is None:
                    f = net(x)
                else:
                    with FeatureExtractor(net, self.layer) as fx:
                        net(x)
                        f = fx.features
                feats.append(f.detach().flatten(1).float())
                labels.append(torch.as_tensor(b.y).long().to(device))
        if not feats:  # this rank's share is empty (tiny data, many ranks): still join the gather
            dim = self._feature_dim(pl_module, dataset)
            feats, labels = [torch.zeros(0, dim, device=device)], [torch.zeros(0, dtype=torch.long, device=device)]
        f_mine, y_mine = torch.cat(feats), torch.cat(labels)
        if world == 1:
            return f_mine, y_mine
        pad = per - f_mine.shape[0]
        f_pad = torch.cat([f_mine, f_mine.new_zeros(pad, f_mine.shape[1])])
        y_pad = torch.cat([y_mine, y_mine.new_zeros(pad)])
        f_all = trainer.strategy.all_gather(f_pad).reshape(world * per, -1)[:n]
        y_all = trainer.strategy.all_gather(y_pad).reshape(world * per)[:n]
        return f_all, y_all

    def _feature_dim(self, pl_module: pl.LightningModule, dataset: Dataset) -> int:
        sample = split_batch(next(iter(DataLoader(Subset(dataset, [0]), batch_size=1))))
        net = self.feature_extractor or pl_module
        with model_mode(net, "eval"), torch.no_grad():
            if self.layer is None:
                return int(net(sample.x.to(pl_module.device)).flatten(1).shape[1])
            with FeatureExtractor(net, self.layer) as fx:
                net(sample.x.to(pl_module.device))
                return int(fx.features.shape[1])

    def _decide(self, trainer: pl.Trainer, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, world, rank = labels.shape[0], trainer.world_size, trainer.global_rank
        if self.method == "deep_knn":
            k = self.k if self.k is not None else default_k(labels, self.normalized_k)
            if k > n - 1:
                raise ValueError(f"DeepKNNPoisonFilter: k must be at most n - 1 = {n - 1} (the training set has "
                                 f"{n} samples; self is excluded), got k={k}")
            self.k_used = k
            per = math.ceil(n / world)
            rows = (min(rank * per, n), min((rank + 1) * per, n))
            keep_mine = deep_knn_filter(features, labels, k, tie_break=self.tie_break,
                                        class_balance=self.class_balance, rows=rows,
                                        chunk_size=self.chunk_size).long()
            if world == 1:
                return keep_mine.bool().cpu()
            padded = torch.cat([keep_mine, keep_mine.new_zeros(per - keep_mine.shape[0])])
            return trainer.strategy.all_gather(padded).reshape(world * per)[:n].bool().cpu()
        keep = torch.ones(n, dtype=torch.bool)
        if rank == 0 or world == 1:
            f, y = features.cpu(), labels.cpu()
            if self.method == "l2_outlier":
                keep = l2_outlier_filter(f, y, self.fraction)
            elif self.method == "one_class_svm":
                keep = one_class_svm_filter(f, y, self.nu)
            else:
                keep = random_eviction(f, y, self.fraction, generator=torch.Generator().manual_seed(self.seed))
        if world > 1:
            keep = trainer.strategy.broadcast(keep, src=0)
        return keep

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, dm: RobustDataModule,
                positions: list[int], at_start: bool) -> None:
        removed = self.removed_indices or []
        metrics: dict[str, float] = {"num_removed": float(len(removed)), "num_examples": float(self.num_examples)}
        poisons = getattr(dm, "poison_indices", None)
        if poisons is not None:
            pos = torch.tensor(positions)
            is_poison = torch.isin(pos, torch.tensor(list(poisons), dtype=torch.long))
            was_removed = torch.isin(pos, torch.tensor(removed, dtype=torch.long))
            scores = poison_detection_scores(was_removed, is_poison)
            self.detection = {k: float(v) for k, v in scores.items()}
            metrics.update(self.detection)
        if at_start:
            self._pending_metrics = metrics  # logged at the first training epoch's start
        else:
            self._log(pl_module, metrics)
        rank_zero_info(f"DeepKNNPoisonFilter ({self.method}{'' if self.k_used is None else f', k={self.k_used}'}):"
                       f" removed {len(removed)} of {self.num_examples} training samples from {type(dm).__name__}")
        path = self.output_path(trainer)  # on every rank: `trainer.log_dir` is a collective under DDP
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({
                "method": self.method, "k": self.k_used, "filtered_before_epoch": self.filtered_before_epoch,
                "num_examples": self.num_examples, "num_removed": len(removed), "removed_indices": removed,
                "detection": self.detection,
            }, indent=1))

    @staticmethod
    def _log(pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
        # The decision is identical on every rank; sync_dist keeps Lightning's DDP bookkeeping consistent.
        for name, value in metrics.items():
            pl_module.log(f"poison_filter/{name}", value, on_step=False, on_epoch=True, sync_dist=True)

    def output_path(self, trainer: pl.Trainer) -> Path:
        """Where the removed positions are written (call on every rank: ``log_dir`` broadcasts under DDP)."""
        if self.output_file is not None:
            return Path(self.output_file)
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root if root is not None else os.getcwd()) / "poison_filter.json"

    # ---- checkpoint state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The removed positions are checkpointed once, by the DataModule (its exclusion set); this records
        # only that (and how) this filter decided, so a resumed run does not decide again.
        return {
            "num_examples": self.num_examples,
            "num_removed": self.num_removed,
            "k_used": self.k_used,
            "filtered_before_epoch": self.filtered_before_epoch,
            "method": self.method,
            "detection": dict(self.detection),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.num_examples = int(state_dict.get("num_examples", 0))
        removed = state_dict.get("removed_indices")  # 0.1.0 states held the positions themselves
        num_removed = state_dict.get("num_removed", None if removed is None else len(removed))
        self.num_removed = None if num_removed is None else int(num_removed)
        self.k_used = state_dict.get("k_used")
        self.filtered_before_epoch = state_dict.get("filtered_before_epoch")
        if self.filtered_before_epoch is None and removed is not None:
            self.filtered_before_epoch = 0  # a 0.1.0 state: it held the indices, so the filter had run
        self.detection = {str(k): float(v) for k, v in state_dict.get("detection", {}).items()}
