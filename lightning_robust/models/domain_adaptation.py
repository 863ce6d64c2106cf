"""Domain adaptation under covariate and label shift with Normalized Wasserstein (arXiv 1902.00415).

Balaji, Chellappa & Feizi (ICCV 2019), section "Domain adaptation": a feature extractor ``F`` and a
classifier ``C`` are trained on labelled source data while ``F``'s features of the two domains are aligned
adversarially. When the class proportions differ between domains, aligning ``P_{F(source)}`` with
``P_{F(target)}`` (DANN, Wasserstein) forces features of different classes onto each other. NW instead
treats the source features as a mixture of their class-conditionals with learnable proportions::

    min_{F, C, π}  L_cls(C(F(x_s)), y_s) + λ max_{D 1-Lip} ( E_t[D(F(x_t))] - Σ_k π_k E_{s | y=k}[D(F(x_s))] )

so the critic compares the target with the *re-weighted* source, and ``π`` estimates the target's class
proportions. One module holds the paper's four methods: ``"source_only"``, ``"dann"``, ``"wasserstein"``
and ``"nw"``.
"""

from __future__ import annotations

import functools
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_robust.models.gan import gradient_penalty
from lightning_robust.ot.normalized_wasserstein import (
    MixtureProportions,
    class_mixture_weights,
    normalized_wasserstein,
)
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.checkpoint import WeightsOnlyLoadFromCheckpoint
from lightning_robust.utils.epoch_means import EpochMeans
from lightning_robust.utils.rng import keyed_generator
from lightning_robust.utils.validation import (
    check_choice,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_seed,
)

__all__ = ["DA_METHODS", "NWDomainAdaptation"]

DA_METHODS = ("source_only", "dann", "wasserstein", "nw")


def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    """Adam(lr 2e-4, betas (0.5, 0.999)): the authors' setting (``--adam``, ``--lr 0.0002``)."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


def _default_proportions_optimizer(params: Any) -> torch.optim.Optimizer:
    """Adam(lr 5e-4, betas (0.5, 0.999)): the authors' ``--lrPi 0.0005``."""
    return torch.optim.Adam(params, lr=5e-4, betas=(0.5, 0.999))


def _in_features(module: nn.Module) -> int | None:
    """The input width a head expects: its ``in_features`` attribute or that of its first ``nn.Linear``."""
    width = getattr(module, "in_features", None)
    if isinstance(width, int):
        return width
    for m in module.modules():
        if isinstance(m, nn.Linear):
            return int(m.in_features)
    return None


def _out_features(module: nn.Module) -> int | None:
    width = getattr(module, "num_classes", None)
    if isinstance(width, int):
        return width
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return int(last.out_features) if last is not None else None


class NWDomainAdaptation(WeightsOnlyLoadFromCheckpoint, pl.LightningModule):  # type: ignore[misc]  # weights-only override
    """Feature extractor + classifier + critic, adapted with NW, plain Wasserstein, DANN, or not at all.

    Each training batch is ``{"source": (x_s, y_s), "target": (x_t, ...)}`` (see
    :class:`~lightning_robust.datamodules.DomainAdaptationDataModule`); target labels are never used for
    training. Per batch, with manual optimisation:

    1. critic step on detached features: maximise ``E_t[D] - Σ_k π_k E_{s|k}[D]`` (``π`` uniform and fixed
       for ``"wasserstein"``, which then weights the source classes as they come: the plain dual), with
       weight clipping (``critic_regularizer="clip"``, the authors' choice) or a gradient penalty at
       target/source-mixture interpolates (``"gp"``); for ``"dann"``, a logistic domain classifier;
    2. ``"nw"`` only: a ``π`` step minimising the same objective with the critic's scores (the authors update
       ``π`` once per batch with its own optimiser);
    3. feature/classifier step: cross-entropy on the source batch, plus ``adaptation_weight`` times the
       critic objective (``F`` minimises it) every ``adversarial_every``-th batch (the authors: every 10th),
       or minus the domain classifier's loss for ``"dann"`` (every batch).

    The source mixture is estimated from the labelled source batch itself: sample ``i`` of class ``k`` has
    weight ``π_k / n_k`` (:func:`~lightning_robust.ot.class_mixture_weights`). With
    ``DomainAdaptationDataModule(classwise_source=True)`` the batch also holds one batch per class
    (``"source_by_class"``) and ``"nw"`` uses those instead, as the authors do:
    ``Σ_k π_k mean_{x ∈ batch_k} D(F(x))`` (the classification loss stays on the mixed source batch).
    Without them, use batches large enough for every class to appear.

    Metrics (``dataloader_idx`` 0 = target, 1 = source): ``val/target_acc`` (overall), ``val/target_class_acc``
    (class-mean: the mean of per-class accuracies, torchmetrics' ``average="macro"``; the authors' number),
    ``val/source_acc``, and ``test/*`` alike; ``train/cls_loss``,
    ``train/critic``, ``train/pi_k``. Under DDP use ``strategy="ddp_find_unused_parameters_true"``.

    Args:
        feature_extractor: images -> feature vectors ``[B, d]``.
        classifier: features -> class logits.
        critic: features -> one score (``"wasserstein"``, ``"nw"``) or one domain logit (``"dann"``);
            may be ``None`` for ``"source_only"``.
        method: one of ``"source_only"``, ``"dann"``, ``"wasserstein"``, ``"nw"``.
        num_classes: number of classes (= mixture components); read from the classifier when ``None``.
        adaptation_weight: λ, the weight of the alignment term (the authors' γ = 1).
        adversarial_every: apply the alignment term to ``F`` every this many batches (Wasserstein/NW).
        critic_regularizer: ``"clip"`` (weights clamped to ``[-clip_value, clip_value]``) or ``"gp"``.
        clip_value: the clamp (the authors: 0.01).
        gp_weight: the gradient-penalty weight for ``"gp"``.
        initial_proportions: the initial ``π`` for ``"nw"`` (uniform by default, as the authors).
        optimizer: ``params -> Optimizer`` for ``F`` and ``C`` (default Adam 2e-4, betas 0.5/0.999).
        critic_optimizer: the same for the critic.
        proportions_optimizer: the same for ``π`` (default Adam 5e-4).
        seed: seed of the gradient-penalty draws.

    Raises:
        ValueError: on an unknown method, missing critic, bad numbers, or (eagerly when the widths are
            known, else at the first batch) a feature width that the classifier or critic does not accept.

    Example:
        >>> model = NWDomainAdaptation(DigitFeatureExtractor(), MLP(768, 3, (100, 100)), MLP(768, 1, (256, 100)),
        ...                            method="nw")
        >>> pl.Trainer(max_epochs=40).fit(model, datamodule=DomainAdaptationDataModule(source, target))
        >>> model.proportions            # estimated target class proportions
    """

    da_step: torch.Tensor

    def __init__(
        self,
        feature_extractor: nn.Module,
        classifier: nn.Module,
        critic: nn.Module | None = None,
        method: str = "nw",
        num_classes: int | None = None,
        adaptation_weight: float = 1.0,
        adversarial_every: int = 10,
        critic_regularizer: str = "clip",
        clip_value: float = 0.01,
        gp_weight: float = 10.0,
        initial_proportions: list[float] | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        critic_optimizer: OptimizerCallable = _default_optimizer,
        proportions_optimizer: OptimizerCallable = _default_proportions_optimizer,
        seed: int = 0,
    ) -> None:
        check_seed("seed", seed)
        super().__init__()
        check_choice("method", method, DA_METHODS)
        for name, mod in (("feature_extractor", feature_extractor), ("classifier", classifier)):
            if not isinstance(mod, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(mod).__name__}")
        if method != "source_only" and not isinstance(critic, nn.Module):
            raise ValueError(f"method={method!r} needs a critic (an nn.Module giving one score per feature vector)")
        check_non_negative("adaptation_weight", adaptation_weight)
        check_positive_int("adversarial_every", adversarial_every)
        check_choice("critic_regularizer", critic_regularizer, ("clip", "gp"))
        check_positive("clip_value", clip_value)
        check_non_negative("gp_weight", gp_weight)
        if num_classes is None:
            num_classes = _out_features(classifier)
            if num_classes is None:
                raise ValueError("num_classes must be given (the classifier has no nn.Linear output layer)")
        check_positive_int("num_classes", num_classes)
        self.save_hyperparameters(ignore=["feature_extractor", "classifier", "critic", "optimizer",
                                          "critic_optimizer", "proportions_optimizer"])
        self.automatic_optimization = False
        self.feature_extractor, self.classifier, self.critic = feature_extractor, classifier, critic
        self.method, self.num_classes = method, num_classes
        self.adaptation_weight, self.adversarial_every = adaptation_weight, adversarial_every
        self.critic_regularizer, self.clip_value, self.gp_weight = critic_regularizer, clip_value, gp_weight
        self.seed = seed
        self.optimizer_factory, self.critic_optimizer_factory = optimizer, critic_optimizer
        self.proportions_optimizer_factory = proportions_optimizer
        # π is learned for NW; for plain Wasserstein it is unused (the source batch is weighted as it comes).
        self.mixture = MixtureProportions(num_classes, initial_proportions, learnable=(method == "nw"))
        self.register_buffer("da_step", torch.zeros((), dtype=torch.long))
        # Epoch-only logs (critic objective, the ten π_k): summed per step, logged per epoch (EpochMeans: a
        # self.log call per value and step cost ~10% of a CPU fit).
        self.epoch_means = EpochMeans()
        self._features_checked = False
        self._check_widths(getattr(feature_extractor, "out_features", None))
        metric = functools.partial(MulticlassAccuracy, num_classes=num_classes)
        self.target_acc, self.target_class_acc, self.source_acc = metric(average="micro"), metric(average="macro"), \
            metric(average="micro")
        self.test_target_acc, self.test_target_class_acc, self.test_source_acc = metric(average="micro"), \
            metric(average="macro"), metric(average="micro")

    # ---- checks -----------------------------------------------------------------------------------------
    def _check_widths(self, width: Any) -> None:
        if not isinstance(width, int):
            return
        heads = [("classifier", self.classifier)] + ([("critic", self.critic)] if self.critic is not None else [])
        for name, head in heads:
            expected = _in_features(head)
            if expected is not None and expected != width:
                raise ValueError(f"feature_extractor produces {width} features per sample but the {name} expects "
                                 f"{expected} (its first nn.Linear's in_features)")
        self._features_checked = True

    def _check_features(self, feats: torch.Tensor) -> None:
        if self._features_checked:
            return
        if feats.ndim != 2:
            raise ValueError(f"feature_extractor must return [B, d] feature vectors, got shape {tuple(feats.shape)}")
        self._check_widths(int(feats.shape[1]))

    # ---- model ------------------------------------------------------------------------------------------
    @property
    def proportions(self) -> torch.Tensor:
        """The current source-mixture proportions ``π`` (the estimate of the target's class proportions)."""
        return self.mixture.proportions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``C(F(x))``."""
        return self.classifier(self.feature_extractor(x))

    def _critic(self, feats: torch.Tensor) -> torch.Tensor:
        out = self.critic(feats)  # type: ignore[misc]
        if out.ndim > 1 and out.shape[-1] != 1:
            raise ValueError(f"the critic must give one score per sample, got output of shape {tuple(out.shape)}")
        return out.reshape(feats.shape[0])

    def _source_weights(self, y_s: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
        if self.method == "nw":
            return class_mixture_weights(y_s, pi)
        return torch.full((y_s.shape[0],), 1.0 / y_s.shape[0], device=y_s.device)

    def alignment_objective(self, f_s: torch.Tensor, y_s: torch.Tensor, f_t: torch.Tensor,
                            pi: torch.Tensor) -> torch.Tensor:
        """``E_t[D(f_t)] - Σ_i w_i D(f_s,i)``: the NW dual (``"nw"``) or the plain Wasserstein dual."""
        if self.method == "nw":
            return normalized_wasserstein(self._critic(f_t), self._critic(f_s), pi, labels=y_s)
        return self._critic(f_t).mean() - self._critic(f_s).mean()

    def _step_generator(self, stream: str) -> torch.Generator:
        """Noise keyed by (seed, step counter, rank, stream): resumable without RNG state, distinct per rank."""
        return keyed_generator(f"{self.seed}/{int(self.da_step)}/{self.global_rank}/{stream}", self.device)

    # ---- training ---------------------------------------------------------------------------------------
    @staticmethod
    def _split(batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, dict):
            if "source" not in batch or "target" not in batch:
                raise ValueError(f"a training batch must have 'source' and 'target' entries, got {sorted(batch)}")
            return batch["source"], batch["target"]
        if isinstance(batch, (list, tuple)) and len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError("a training batch must be {'source': ..., 'target': ...} (DomainAdaptationDataModule)")

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        opt_fc = opts[0]
        src, tgt = self._split(batch)
        s, t = split_batch(src), split_batch(tgt)
        x_s, y_s = s.x, s.y.long()
        n_s = int(x_s.shape[0])
        f_s = self.feature_extractor(x_s)
        self._check_features(f_s)
        cls_loss = F.cross_entropy(self.classifier(f_s), y_s)
        loss = cls_loss
        by_class = batch.get("source_by_class") if isinstance(batch, dict) else None

        if self.method != "source_only":
            opt_d = opts[1]
            f_t = self.feature_extractor(t.x)
            if self.method == "dann":
                ones = torch.ones(f_s.shape[0], device=self.device)
                zeros = torch.zeros(f_t.shape[0], device=self.device)
                d_loss = (F.binary_cross_entropy_with_logits(self._critic(f_s.detach()), ones)
                          + F.binary_cross_entropy_with_logits(self._critic(f_t.detach()), zeros))
                opt_d.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
                opt_d.step()
                dom = (F.binary_cross_entropy_with_logits(self._critic(f_s), ones)
                       + F.binary_cross_entropy_with_logits(self._critic(f_t), zeros))
                loss = cls_loss - self.adaptation_weight * dom
                self.epoch_means.add({"domain_loss": d_loss}, n_s)
            else:
                pi = self.mixture()
                if by_class is not None and self.method == "nw":
                    # The authors' estimate of the source mixture: one batch per class, Σ_k π_k mean_k D.
                    parts = [split_batch(b) for b in by_class]
                    f_s = self.feature_extractor(torch.cat([p.x for p in parts]))
                    y_s = torch.cat([p.y.long() for p in parts])
                fs_d, ft_d = f_s.detach(), f_t.detach()
                d_t, d_s = self._critic(ft_d), self._critic(fs_d)
                w = self._source_weights(y_s, pi.detach())
                critic_obj = d_t.mean() - (w * d_s).sum()
                d_loss = -critic_obj
                if self.critic_regularizer == "gp" and self.gp_weight > 0:
                    # Interpolate target features with a sample of the (re-weighted) source mixture.
                    rows = torch.multinomial(w.detach().double(), ft_d.shape[0], replacement=True,
                                             generator=self._step_generator("mix"))
                    gp = gradient_penalty(self.critic, ft_d,  # type: ignore[arg-type]
                                           fs_d[rows], self._step_generator("gp"))
                    d_loss = d_loss + self.gp_weight * gp
                opt_d.zero_grad(set_to_none=True)
                self.manual_backward(d_loss)
                opt_d.step()
                if self.critic_regularizer == "clip":
                    with torch.no_grad():
                        for p in self.critic.parameters():  # type: ignore[union-attr]
                            p.clamp_(-self.clip_value, self.clip_value)
                if self.method == "nw":
                    # π minimises the dual for the critic's scores (needs no new forward pass).
                    opt_pi = opts[2]
                    pi_obj = d_t.detach().mean() - (self._source_weights(y_s, self.mixture()) * d_s.detach()).sum()
                    opt_pi.zero_grad(set_to_none=True)
                    self.manual_backward(pi_obj)
                    opt_pi.step()
                if int(self.da_step) % self.adversarial_every == 0 and self.adaptation_weight > 0:
                    align = self.alignment_objective(f_s, y_s, f_t, self.mixture().detach())
                    loss = cls_loss + self.adaptation_weight * align
                epoch_logs = {"critic": critic_obj}
                if self.method == "nw":
                    epoch_logs.update({f"pi_{k}": p for k, p in enumerate(self.proportions)})
                self.epoch_means.add(epoch_logs, n_s)

        opt_fc.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        opt_fc.step()
        self.log("train/cls_loss", cls_loss.detach(), prog_bar=True, on_step=True, on_epoch=True, sync_dist=True,
                 batch_size=n_s)
        self.da_step += 1

    def on_train_epoch_end(self) -> None:
        """Log the epoch means of ``train/critic``, ``train/domain_loss`` and ``train/pi_k``."""
        self.epoch_means.log(self, prefix="train/")

    # ---- evaluation -------------------------------------------------------------------------------------
    def _eval_step(self, batch: Any, dataloader_idx: int, stage: str) -> None:
        b = split_batch(batch)
        pred = self(b.x).argmax(dim=1)
        n = int(b.x.shape[0])
        if dataloader_idx == 0:
            acc, cacc = (self.target_acc, self.target_class_acc) if stage == "val" else \
                (self.test_target_acc, self.test_target_class_acc)
            acc.update(pred, b.y)
            cacc.update(pred, b.y)
            self.log(f"{stage}/target_acc", acc, on_epoch=True, add_dataloader_idx=False, prog_bar=True, batch_size=n)
            self.log(f"{stage}/target_class_acc", cacc, on_epoch=True, add_dataloader_idx=False, batch_size=n)
        else:
            acc = self.source_acc if stage == "val" else self.test_source_acc
            acc.update(pred, b.y)
            self.log(f"{stage}/source_acc", acc, on_epoch=True, add_dataloader_idx=False, batch_size=n)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(split_batch(batch).x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        fc = list(self.feature_extractor.parameters()) + list(self.classifier.parameters())
        opts = [self.optimizer_factory(fc)]
        if self.method != "source_only":
            opts.append(self.critic_optimizer_factory(self.critic.parameters()))  # type: ignore[union-attr]
        if self.method == "nw":
            opts.append(self.proportions_optimizer_factory([self.mixture.logits]))
        return opts
