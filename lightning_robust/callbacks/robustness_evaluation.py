"""Clean and robust accuracy during validation, for any LightningModule whose forward returns logits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn

from lightning_robust.attacks import Attack, as_attack, model_mode
from lightning_robust.metrics import RobustAccuracy
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.validation import check_fraction, check_positive_int, check_seed

__all__ = ["RobustnessEvaluation"]


class RobustnessEvaluation(pl.Callback):
    """Attack the first validation batches and log clean and robust accuracy per attack.

    After every ``every_n_epochs``-th validation epoch (and in ``trainer.validate``) logs
    ``{prefix}/clean_acc`` and ``{prefix}/{name}_acc`` for each attack, computed over the first
    ``max_batches`` validation batches of each process and summed over processes (so a DDP run reports the
    same numbers as one process that sees the same samples). It also looks for the signs of a dishonest
    evaluation (Carlini et al. 2019, "On Evaluating Adversarial Robustness", arXiv 1902.06705) and warns:

    * robust accuracy above clean accuracy (the attack made the model *better*: a broken attack);
    * inputs whose loss gradient is exactly zero (gradient masking: gradient attacks cannot work there),
      logged as ``{prefix}/zero_grad_fraction``;
    * adversarial examples outside the attack's budget or the value bounds, logged as
      ``{prefix}/{name}_violations``.

    The attacked module is only required to map inputs to logits; the callback never imports models.
    Random starts draw from a generator seeded by ``seed``, the epoch, the batch and the rank.

    Args:
        attacks: ``{"name": attack}``, e.g. ``{"pgd20": PGD(eps=8/255, alpha=2/255, steps=20)}``.
        every_n_epochs: evaluate after every n-th validation epoch.
        max_batches: validation batches per process to attack (``None``: all).
        log_prefix: prefix of the logged keys.
        zero_grad_tolerance: warn when more than this fraction of inputs have an all-zero gradient.
        seed: seed of the attacks' random starts.

    Raises:
        ValueError: on an empty ``attacks``, a name that is not a string, or a bad count or fraction.

    Example:
        >>> callback = RobustnessEvaluation({"pgd20": PGD(eps=0.1, alpha=0.025, steps=20),
        ...                                  "recoloradv": ReColorAdv()}, every_n_epochs=5, max_batches=4)
        >>> pl.Trainer(callbacks=[callback]).fit(model, datamodule=dm)
    """

    def __init__(
        self,
        attacks: Mapping[str, Attack],
        every_n_epochs: int = 1,
        max_batches: int | None = 4,
        log_prefix: str = "robust",
        zero_grad_tolerance: float = 0.1,
        seed: int = 0,
    ) -> None:
        check_seed("seed", seed)
        if not isinstance(attacks, Mapping) or not attacks:
            raise ValueError(f"attacks must be a non-empty mapping of name -> Attack, got {attacks!r}")
        for name in attacks:
            if not isinstance(name, str) or not name:
                raise ValueError(f"attack names must be non-empty strings, got {name!r}")
        # Foreign attacks (callables, torchattacks objects) get the Attack interface and its honesty checks.
        self.attacks = {name: as_attack(attack, argument=f"attacks[{name!r}]") for name, attack in attacks.items()}
        self.every_n_epochs = check_positive_int("every_n_epochs", every_n_epochs)
        self.max_batches = None if max_batches is None else check_positive_int("max_batches", max_batches)
        self.log_prefix = log_prefix
        self.zero_grad_tolerance = check_fraction("zero_grad_tolerance", zero_grad_tolerance, inclusive_high=True)
        self.seed = int(seed)
        self.results: dict[str, float] = {}
        self._active = False
        self._clean: RobustAccuracy | None = None
        self._robust: dict[str, RobustAccuracy] = {}
        self._counts = torch.zeros(0)

    # ---- hooks ---------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING
        due = not fitting or (trainer.current_epoch + 1) % self.every_n_epochs == 0
        self._active = due and not trainer.sanity_checking
        if not self._active:
            return
        self._clean = RobustAccuracy().to(pl_module.device)
        self._robust = {name: RobustAccuracy(attack).to(pl_module.device) for name, attack in self.attacks.items()}
        # [zero-gradient inputs, inputs, violations per attack...]: summed over ranks at epoch end.
        self._counts = torch.zeros(2 + len(self.attacks), dtype=torch.float64, device=pl_module.device)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._active or dataloader_idx != 0 or (self.max_batches is not None and batch_idx >= self.max_batches):
            return
        assert self._clean is not None
        x, y, _ = split_batch(batch)
        self._clean.update(pl_module, x, y)
        zero, n = _zero_gradient_inputs(pl_module, x, y)
        self._counts[0] += zero
        self._counts[1] += n
        for i, (name, attack) in enumerate(self.attacks.items()):
            generator = torch.Generator(device=x.device)
            generator.manual_seed(self.seed * 1_000_003 + trainer.current_epoch * 10_007 + batch_idx * 101
                                  + trainer.global_rank)
            x_adv = attack(pl_module, x, y, generator=generator)
            self._robust[name].update(pl_module, x, y, x_adv=x_adv)
            self._counts[2 + i] += float((~attack.within_budget(x_adv, x)).sum())

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active:
            return
        self._active = False
        assert self._clean is not None
        counts = self._counts
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        clean = float(self._clean.compute())
        results = {"clean_acc": clean, "zero_grad_fraction": float(counts[0] / counts[1].clamp_min(1))}
        for i, (name, metric) in enumerate(self._robust.items()):
            results[f"{name}_acc"] = float(metric.compute())
            results[f"{name}_violations"] = float(counts[2 + i])
        self.results = results
        for key, value in results.items():
            pl_module.log(f"{self.log_prefix}/{key}", value, sync_dist=False)
        self._warn_if_dishonest(results)

    def _warn_if_dishonest(self, results: dict[str, float]) -> None:
        clean = results["clean_acc"]
        for name in self.attacks:
            robust = results[f"{name}_acc"]
            if robust > clean + 1e-9:
                rank_zero_warn(f"RobustnessEvaluation: accuracy under {name!r} ({robust:.4f}) is above clean accuracy "
                               f"({clean:.4f}); the attack makes the model better, so it is broken or too weak "
                               "to trust")
            if results[f"{name}_violations"] > 0:
                rank_zero_warn(f"RobustnessEvaluation: {int(results[f'{name}_violations'])} adversarial examples of "
                               f"{name!r} lie outside its budget or the value bounds; the reported robust accuracy "
                               "is not for the stated threat model")
        if results["zero_grad_fraction"] > self.zero_grad_tolerance:
            rank_zero_warn(f"RobustnessEvaluation: {results['zero_grad_fraction']:.1%} of the inputs have an all-zero "
                           "loss gradient (gradient masking?); gradient-based robust accuracy overstates robustness")

    # ---- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"results": dict(self.results)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = {str(k): float(v) for k, v in state_dict.get("results", {}).items()}


def _zero_gradient_inputs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(inputs whose cross-entropy gradient is exactly zero, inputs)`` for a batch, in eval mode."""
    with torch.inference_mode(False), torch.enable_grad(), model_mode(model, "eval"):
        x0 = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x0), y.detach().clone(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x0)
    return float((grad.flatten(1).abs().amax(1) == 0).sum()), float(x.shape[0])
