"""A DataModule wrapper that plants clean-label poisons in another DataModule's training set.

The setting of the clean-label poisoning papers (Shafahi et al. 2018; Zhu et al. 2019) and of the Deep k-NN
defence (Peri et al., arXiv 1909.13374): a target test image of class ``target_class`` should be classified
as ``base_class`` after training; a few training images of ``base_class`` (the bases) are replaced by
poisons crafted from them, which keep their clean ``base_class`` labels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from lightning_robust.attacks.poisons import LayerFeatures, PoisonAttack, nearest_to_target
from lightning_robust.datamodules.base import RobustDataModule
from lightning_robust.utils.checkpoint import load_module, safe_load
from lightning_robust.utils.validation import check_choice, check_non_negative, check_positive_int, check_seed

__all__ = ["PoisonSwapDataset", "PoisonedDataModule", "dataset_labels"]

BASE_SELECTIONS = ("nearest", "first", "random")


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Labels of a map-style ``(x, y, ...)`` dataset, without loading images where the structure allows."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].long().clone()
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):  # type: ignore[arg-type]
        return torch.as_tensor(targets, dtype=torch.long).clone()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


class PoisonSwapDataset(Dataset):
    """``dataset`` with the items at ``positions`` replaced by ``poisons`` (labels unchanged: clean-label).

    Poisons are returned as stored (the wrapped dataset's transforms do not apply to them).
    """

    def __init__(self, dataset: Dataset, positions: Sequence[int], poisons: torch.Tensor) -> None:
        if len(positions) != poisons.shape[0]:
            raise ValueError(f"got {len(positions)} poison positions but {poisons.shape[0]} poisons")
        self.dataset = dataset
        self.positions = [int(p) for p in positions]
        self.poisons = poisons
        self._slot = {p: i for i, p in enumerate(self.positions)}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        slot = self._slot.get(int(index))
        if slot is None:
            return item
        return (self.poisons[slot], *tuple(item)[1:])


class PoisonedDataModule(RobustDataModule):
    """Wrap any :class:`RobustDataModule`; swap some training images of ``base_class`` for clean-label poisons.

    Batches always carry indices (``(x, y, index)``, ``index`` = position in :attr:`train_dataset`), and
    :attr:`poison_indices` / :attr:`is_poisoned` say which positions hold poisons, for
    :class:`~lightning_robust.metrics.PoisonDetection` and the filter callback.

    Poisons come either precomputed (``poisons``: a tensor or a weights-only file with ``"poisons"`` and
    ``"indices"``, plus ``poison_indices``) or are crafted in :meth:`setup` by ``attack`` against
    ``feature_net`` (at layer ``feature_layer``, weights from ``feature_checkpoint``): the target is the
    ``target_index``-th test image of ``target_class``, the bases are ``num_poisons`` training images of
    ``base_class`` chosen by ``base_selection``. Under DDP rank 0 crafts and broadcasts, so every rank
    trains on identical poisons; they are also stored in this module's checkpoint state.

    Args:
        datamodule: the clean DataModule (its loaders' settings are reused).
        attack: :class:`~lightning_robust.attacks.FeatureCollision` or
            :class:`~lightning_robust.attacks.ConvexPolytope` (or any ``PoisonAttack``).
        feature_net: the network the attacker crafts against (ignored with precomputed poisons).
        feature_layer: its feature layer (dotted name); ``None`` uses the net's output as features.
        feature_checkpoint: optional weights-only checkpoint loaded into ``feature_net``.
        target_class: the class of the target image.
        base_class: the class the target should be pushed into (the poisons' clean label).
        num_poisons: number of poisons (bases).
        target_index: which test image of ``target_class`` is the target.
        base_selection: ``"nearest"`` (bases closest to the target in feature space, as Poison Frogs),
            ``"first"`` (first ones in the training set, as CP's default) or ``"random"``.
        poisons: precomputed poisons ``[num_poisons, C, H, W]`` or the path of a weights-only file holding
            ``{"poisons": ..., "indices": ...}``.
        poison_indices: training positions of precomputed poisons (read from the file when omitted).
        examples_per_class: keep only this many training images per class (seeded), e.g. the paper's
            transfer-learning set of 50 per class; ``None`` keeps all.
        seed: seed of the subsampling and of random base selection.

    Raises:
        ValueError: on equal target and base classes, a missing attack / feature net / poisons, or too few
            images of a class.

    Example:
        >>> dm = PoisonedDataModule(DigitsDataModule(), attack=ConvexPolytope(steps=300), feature_net=net,
        ...                         feature_layer="classifier.3", target_class=3, base_class=8)
        >>> dm.setup(); dm.poison_indices
    """

    def __init__(
        self,
        datamodule: RobustDataModule,
        attack: PoisonAttack | None = None,
        feature_net: nn.Module | None = None,
        feature_layer: str | None = None,
        feature_checkpoint: str | None = None,
        target_class: int = 0,
        base_class: int = 1,
        num_poisons: int = 5,
        target_index: int = 0,
        base_selection: str = "nearest",
        poisons: str | torch.Tensor | None = None,
        poison_indices: Sequence[int] | None = None,
        examples_per_class: int | None = None,
        seed: int = 0,
    ) -> None:
        check_seed("seed", seed)
        if not isinstance(datamodule, RobustDataModule):
            raise TypeError(f"datamodule must be a RobustDataModule, got {type(datamodule).__name__}")
        loader = datamodule.loader_options
        loader["with_index"] = True  # the filter and the detection metric need the sample positions
        super().__init__(**loader)
        for name, value in (("target_class", target_class), ("base_class", base_class),
                            ("target_index", target_index), ("seed", seed)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            check_non_negative(name, value)
        if target_class == base_class:
            raise ValueError(f"target_class and base_class must differ, both are {target_class}")
        check_positive_int("num_poisons", num_poisons)
        check_choice("base_selection", base_selection, BASE_SELECTIONS)
        if examples_per_class is not None:
            check_positive_int("examples_per_class", examples_per_class)
        if poisons is None and attack is None:
            raise ValueError("give either precomputed `poisons` or an `attack` (with `feature_net`) to craft them")
        if poisons is None and feature_net is None:
            raise ValueError("crafting poisons with `attack` needs `feature_net`, the network attacked")
        if attack is not None and not isinstance(attack, PoisonAttack):
            raise TypeError(f"attack must be a PoisonAttack (FeatureCollision, ConvexPolytope), "
                            f"got {type(attack).__name__}")
        if isinstance(poisons, (str, os.PathLike)) and not os.path.isfile(poisons):
            raise ValueError(f"poisons file {str(poisons)!r} does not exist")
        self.save_hyperparameters(ignore=["datamodule", "attack", "feature_net", "poisons"])
        self.datamodule = datamodule
        self.attack = attack
        self.feature_net = feature_net
        self.feature_layer = feature_layer
        self.feature_checkpoint = feature_checkpoint
        self.target_class, self.base_class = target_class, base_class
        self.num_poisons, self.target_index = num_poisons, target_index
        self.base_selection = base_selection
        self.poisons_source = poisons
        self.poison_indices_arg = None if poison_indices is None else [int(i) for i in poison_indices]
        self.examples_per_class = examples_per_class
        self.poison_seed = seed
        self.target: torch.Tensor | None = None
        self.target_label: int = target_class
        self.poisons: torch.Tensor | None = None
        self._poison_positions: list[int] = []
        self._restored_poisons: torch.Tensor | None = None

    # ---- data --------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return self.datamodule.num_classes

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    @property
    def poison_indices(self) -> list[int]:
        """Sorted positions in :attr:`train_dataset` that hold poisons."""
        return sorted(self._poison_positions)

    @property
    def is_poisoned(self) -> torch.Tensor:
        """BoolTensor over :attr:`train_dataset`: ``True`` at poisoned positions."""
        if self.train_dataset is None:
            raise RuntimeError("call setup() first")
        mask = torch.zeros(len(self.train_dataset), dtype=torch.bool)  # type: ignore[arg-type]
        mask[self.poison_indices] = True
        return mask

    @property
    def base_indices(self) -> list[int]:
        """The poisons' positions in the order of :attr:`poisons` (poison ``i`` replaced base ``i``)."""
        return list(self._poison_positions)

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        self.datamodule.setup(stage)
        clean = self.datamodule.train_dataset
        if clean is None:
            raise RuntimeError(f"{type(self.datamodule).__name__} has no training set")
        labels = dataset_labels(clean)
        if self.examples_per_class is not None:
            keep = self._subsample(labels)
            clean, labels = Subset(clean, keep), labels[torch.as_tensor(keep, dtype=torch.long)]
        self.val_dataset = self.datamodule.val_dataset
        self.test_dataset = self.datamodule.test_dataset
        self.target = self._find_target()
        if self.poisons_source is not None:
            poisons, positions = self._load_precomputed()
        else:
            positions = self._choose_bases(clean, labels)
            poisons = self._craft(clean, positions)
        if self._restored_poisons is not None:
            poisons = self._restored_poisons
        bad = [p for p in positions if int(labels[p]) != self.base_class]
        if bad and self.poisons_source is None:
            raise RuntimeError(f"bases at {bad} are not of base_class {self.base_class}")
        self._poison_positions = positions
        self.poisons = poisons
        self.train_dataset = PoisonSwapDataset(clean, positions, poisons)

    def _subsample(self, labels: torch.Tensor) -> list[int]:
        g = torch.Generator().manual_seed(self.poison_seed)
        keep: list[int] = []
        for c in torch.unique(labels).tolist():
            members = (labels == c).nonzero().flatten()
            if members.numel() < self.examples_per_class:  # type: ignore[operator]
                raise ValueError(f"class {c} has {members.numel()} training images, fewer than "
                                 f"examples_per_class={self.examples_per_class}")
            keep += members[torch.randperm(members.numel(), generator=g)[: self.examples_per_class]].tolist()
        return sorted(keep)

    def _find_target(self) -> torch.Tensor:
        pool = self.test_dataset if self.test_dataset is not None else self.val_dataset
        if pool is None:
            raise RuntimeError("the wrapped DataModule has neither a test nor a validation set to take the target from")
        labels = dataset_labels(pool)
        members = (labels == self.target_class).nonzero().flatten()
        if self.target_index >= members.numel():
            raise ValueError(f"target_index={self.target_index} but the test set has only {members.numel()} "
                             f"images of target_class {self.target_class}")
        return torch.as_tensor(pool[int(members[self.target_index])][0]).float()

    def _load_precomputed(self) -> tuple[torch.Tensor, list[int]]:
        src = self.poisons_source
        indices = self.poison_indices_arg
        if isinstance(src, torch.Tensor):
            poisons = src
        else:
            blob = safe_load(str(src))
            if not isinstance(blob, dict) or "poisons" not in blob:
                raise ValueError(f"poisons file {str(src)!r} must hold a dict with 'poisons' (and 'indices')")
            poisons = blob["poisons"]
            if indices is None and "indices" in blob:
                indices = [int(i) for i in torch.as_tensor(blob["indices"]).tolist()]
        if indices is None:
            raise ValueError("precomputed poisons need poison_indices (their positions in the training set)")
        if len(indices) != poisons.shape[0]:
            raise ValueError(f"got {poisons.shape[0]} poisons but {len(indices)} poison_indices")
        return poisons.detach().float().cpu(), indices

    def _extractor(self) -> nn.Module:
        assert self.feature_net is not None
        net = self.feature_net
        if self.feature_checkpoint is not None:
            net = load_module(self.feature_checkpoint, into=net)
        return LayerFeatures(net, self.feature_layer) if self.feature_layer else net

    def _device(self) -> torch.device:
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _choose_bases(self, clean: Dataset, labels: torch.Tensor) -> list[int]:
        members = (labels == self.base_class).nonzero().flatten()
        if members.numel() < self.num_poisons:
            raise ValueError(f"base_class {self.base_class} has {members.numel()} training images, fewer than "
                             f"num_poisons={self.num_poisons}")
        if self.base_selection == "first":
            return members[: self.num_poisons].tolist()
        if self.base_selection == "random":
            g = torch.Generator().manual_seed(self.poison_seed)
            return members[torch.randperm(members.numel(), generator=g)[: self.num_poisons]].tolist()
        device = self._device()
        extractor = self._extractor().to(device)
        images = torch.stack([torch.as_tensor(clean[int(i)][0]) for i in members]).float()
        assert self.target is not None
        order = nearest_to_target(extractor, images.to(device), self.target.to(device), self.num_poisons)
        return members[order.cpu()].tolist()

    def _craft(self, clean: Dataset, positions: list[int]) -> torch.Tensor:
        assert self.attack is not None and self.target is not None
        trainer = getattr(self, "trainer", None)
        distributed = trainer is not None and trainer.world_size > 1
        poisons = torch.empty(0)
        if not distributed or trainer.global_rank == 0:  # type: ignore[union-attr]
            device = self._device()
            extractor = self._extractor().to(device)
            bases = torch.stack([torch.as_tensor(clean[p][0]) for p in positions]).float().to(device)
            poisons = self.attack(extractor, bases, self.target.to(device)).cpu()
            if self.feature_net is not None:
                self.feature_net.cpu()
        if distributed:
            poisons = trainer.strategy.broadcast(poisons, src=0)  # type: ignore[union-attr]
        return poisons

    # ---- checkpoint state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.poisons is not None:
            state["poisons"] = self.poisons.clone()
            state["poison_indices"] = list(self._poison_positions)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "poisons" in state_dict:
            self._restored_poisons = torch.as_tensor(state_dict["poisons"])
            if isinstance(self.train_dataset, PoisonSwapDataset):
                self.train_dataset.poisons = self._restored_poisons
                self.poisons = self._restored_poisons

    def save_poisons(self, path: str | os.PathLike) -> None:
        """Write ``{"poisons", "indices", "target", "target_class", "base_class"}`` (weights-only loadable)."""
        if self.poisons is None or self.target is None:
            raise RuntimeError("call setup() first")
        torch.save({"poisons": self.poisons, "indices": torch.tensor(self._poison_positions),
                    "target": self.target, "target_class": self.target_class, "base_class": self.base_class},
                   path)
