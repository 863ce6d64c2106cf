"""Clean and robust accuracy in validation and test, for any LightningModule whose forward returns logits."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_robust.attacks import Attack, ThreatModel, as_attack, model_mode
from lightning_robust.attacks.foreign import is_torchattacks
from lightning_robust.callbacks.evaluation_callback import EvaluationCallback, renamed_argument
from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.validation import check_fraction, check_positive_int, check_seed

__all__ = ["RobustnessEvaluation"]

AttackLike = Callable[..., torch.Tensor]


class RobustnessEvaluation(EvaluationCallback):
    """Attack the shared evaluated subset and log clean and robust accuracy per attack.

    In validation during fit (after epochs ``n-1, 2n-1, ...`` for ``every_n_epochs=n``), in
    ``trainer.validate`` and in ``trainer.test``, logs ``{prefix}/clean_acc`` and ``{prefix}/{name}_acc``
    for each attack over the first ``num_samples`` inputs of the evaluation data (the subset shared with
    the other evaluation callbacks, see :mod:`~lightning_robust.callbacks.evaluation_callback`), counted
    over all processes, so a DDP run reports the same numbers as one process that sees the same inputs.
    Robust accuracy is ``mean_i [net(x_adv_i) = y_i]``, with ``x_adv = attack(net, x, y)``.

    It also looks for the signs of a dishonest evaluation (Carlini et al. 2019, "On Evaluating Adversarial
    Robustness", arXiv 1902.06705) and warns:

    * robust accuracy above clean accuracy (the attack made the model *better*: a broken attack);
    * inputs whose loss gradient is exactly zero (gradient masking: gradient attacks cannot work there),
      logged as ``{prefix}/zero_grad_fraction``;
    * adversarial examples outside the attack's budget or the value bounds, logged as
      ``{prefix}/{name}_violations`` (for a foreign callable attack only the [0, 1] box is checked).

    In ``setup`` (before the first step) it checks ``net`` and that the data lie in every attack's value
    bounds, so a normalised data set fails at once instead of after an epoch.

    Args:
        attacks: ``{"name": attack}``, e.g. ``{"pgd20": PGD(eps=8/255, alpha=2/255, steps=20)}``; any callable
            ``attack(model, x, y) -> x_adv`` is accepted.
        every_n_epochs: during fit, evaluate after epochs ``n-1, 2n-1, ...`` (0: never during fit).
        num_samples: inputs to attack over all processes (a prefix of the shared subset).
        prefix: prefix of the logged keys.
        net: dotted path of the submodule to attack (``None``: the LightningModule).
        batch_size: most inputs per attack call.
        zero_grad_tolerance: warn when more than this fraction of inputs have an all-zero gradient.
        seed: seed of the attacks' random starts (keyed by epoch, chunk and rank).
        prog_bar: show the numbers in the progress bar.
        max_batches: deprecated (was: batches per process); ``num_samples = max_batches * batch size``.
        log_prefix: deprecated name of ``prefix``.

    Raises:
        TypeError: on an attack that is not callable or a mistyped argument.
        ValueError: on an empty ``attacks``, a bad name or count; when the run starts, on a ``net`` that is not a
            submodule or data outside an attack's bounds.

    Example:
        >>> callback = RobustnessEvaluation({"pgd20": PGD(eps=0.1, alpha=0.025, steps=20)}, num_samples=512)
        >>> trainer = pl.Trainer(callbacks=[callback])
        >>> trainer.fit(model, datamodule=dm)
        >>> trainer.test(model, datamodule=dm)[0]["robust/pgd20_acc"]
    """

    def __init__(
        self,
        attacks: Mapping[str, Attack | AttackLike],
        every_n_epochs: int = 1,
        num_samples: int = 256,
        prefix: str = "robust",
        net: str | None = None,
        batch_size: int = 256,
        zero_grad_tolerance: float = 0.1,
        seed: int = 0,
        prog_bar: bool = False,
        max_batches: int | None = None,
        log_prefix: str | None = None,
    ) -> None:
        prefix = renamed_argument("RobustnessEvaluation", "log_prefix", log_prefix, "prefix", prefix, "robust")
        if max_batches is not None:
            check_positive_int("max_batches", max_batches)
            renamed_argument("RobustnessEvaluation", "max_batches", max_batches, "num_samples", num_samples, 256)
        super().__init__(every_n_epochs=every_n_epochs, prefix=prefix, net=net, num_samples=num_samples,
                         prog_bar=prog_bar)
        check_seed("seed", seed)
        if not isinstance(attacks, Mapping):
            raise TypeError(f"attacks must be a mapping of name -> attack, got {type(attacks).__name__}")
        if not attacks:
            raise ValueError("attacks must be a non-empty mapping of name -> attack, got an empty one")
        for name, attack in attacks.items():
            if not isinstance(name, str):
                raise TypeError(f"attack names must be strings, got {type(name).__name__}")
            if not name:
                raise ValueError("attack names must be non-empty strings, got ''")
            if not callable(attack):
                raise TypeError(f"attacks[{name!r}] must be an Attack or a callable attack(model, x, y) -> x_adv, "
                                f"got {type(attack).__name__}")
        # torchattacks objects and callables that carry a ThreatModel get the Attack interface and its honesty
        # checks (budget, box, finiteness); a bare callable says nothing of its budget, so only the [0, 1] box
        # can be checked for it (``_violations``).
        self.attacks: dict[str, Attack | AttackLike] = {
            name: as_attack(attack, argument=f"attacks[{name!r}]")
            if is_torchattacks(attack) or isinstance(getattr(attack, "threat", None), ThreatModel) else attack
            for name, attack in attacks.items()}
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.zero_grad_tolerance = check_fraction("zero_grad_tolerance", zero_grad_tolerance, inclusive_high=True)
        self.seed = int(seed)
        self._max_batches = max_batches
        self.results: dict[str, float] = {}

    @property
    def log_prefix(self) -> str:
        """Deprecated alias of :attr:`prefix`."""
        return self.prefix

    # ---- fail fast -----------------------------------------------------------------------------------
    def check_setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().check_setup(trainer, pl_module, stage)
        batch = self.peek_batch(trainer, stage)
        if batch is None:
            return
        x = split_batch(batch).x
        if self._max_batches is not None:
            self.num_samples = self._max_batches * len(x)
            self._max_batches = None
        if not torch.is_tensor(x) or not x.is_floating_point() or x.numel() == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        for name, attack in self.attacks.items():
            threat = getattr(attack, "threat", None)
            low, high = (threat.low, threat.high) if threat is not None else (0.0, 1.0)
            if lo < low - 1e-6 or hi > high + 1e-6:
                which = "test" if stage == "test" else "validation"
                raise ValueError(
                    f"RobustnessEvaluation: the {which} inputs lie in [{lo:.4g}, {hi:.4g}], outside the value "
                    f"bounds [{low:g}, {high:g}] of attacks[{name!r}], so the attack would clip them and measure "
                    "another threat model; put the normalisation inside the model (as its first layer) and feed "
                    "pixels in [0, 1], or set low/high of the attack's ThreatModel to the data's range")

    # ---- evaluation ----------------------------------------------------------------------------------
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                 data: tuple[torch.Tensor, torch.Tensor] | None, stage: str) -> None:
        net = self.resolve_net(pl_module)
        device = pl_module.device
        # [clean correct, zero-gradient inputs, inputs, then per attack: correct, violations]
        counts = torch.zeros(3 + 2 * len(self.attacks), dtype=torch.float64, device=device)
        if data is not None:
            x_all, y_all = data[0].to(device), data[1].to(device)
            for c, (x, y) in enumerate(zip(x_all.split(self.batch_size), y_all.split(self.batch_size))):
                counts[0] += _correct(net, x, y)
                zero, n = _zero_gradient_inputs(net, x, y)
                counts[1] += zero
                counts[2] += n
                for i, attack in enumerate(self.attacks.values()):
                    x_adv = self._attack(trainer, attack, net, x, y, c)
                    counts[3 + 2 * i] += _correct(net, x_adv, y)
                    counts[4 + 2 * i] += _violations(attack, x_adv, x)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        n = float(counts[2])
        total = max(n, 1.0)
        results = {"clean_acc": float(counts[0]) / total, "zero_grad_fraction": float(counts[1]) / total}
        for i, name in enumerate(self.attacks):
            results[f"{name}_acc"] = float(counts[3 + 2 * i]) / total
            results[f"{name}_violations"] = float(counts[4 + 2 * i])
        self.results = results
        self.log_metrics(pl_module, results, batch_size=int(n))
        self._warn_if_dishonest(results)

    def _attack(self, trainer: pl.Trainer, attack: AttackLike, net: nn.Module, x: torch.Tensor, y: torch.Tensor,
                chunk: int) -> torch.Tensor:
        if isinstance(attack, Attack):
            generator = torch.Generator(device=x.device)
            generator.manual_seed(self.seed * 1_000_003 + trainer.current_epoch * 10_007 + chunk * 101
                                  + trainer.global_rank)
            return attack(net, x, y, generator=generator)
        with torch.inference_mode(False), torch.enable_grad():
            x_adv = attack(net, x.detach().clone(), y.detach().clone())
        if not torch.is_tensor(x_adv) or x_adv.shape != x.shape:
            raise TypeError(f"RobustnessEvaluation: a callable attack must return a tensor shaped like x "
                            f"{tuple(x.shape)}, got {type(x_adv).__name__}"
                            + (f" of shape {tuple(x_adv.shape)}" if torch.is_tensor(x_adv) else ""))
        return x_adv.detach()

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


def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Correct predictions of ``model`` (in eval mode) on ``x``."""
    with torch.no_grad(), model_mode(model, "eval"):
        return float((model(x).argmax(1) == y).sum())


def _violations(attack: AttackLike, x_adv: torch.Tensor, x: torch.Tensor) -> float:
    """Adversarial examples outside the attack's budget (our attacks) or the [0, 1] box (foreign ones)."""
    if isinstance(attack, Attack):
        return float((~attack.within_budget(x_adv, x)).sum())
    outside = (x_adv < -1e-6) | (x_adv > 1 + 1e-6) | ~torch.isfinite(x_adv)
    return float(outside.flatten(1).any(1).sum())


def _zero_gradient_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(inputs whose cross-entropy gradient is exactly zero, inputs)`` for a batch, in eval mode."""
    with torch.inference_mode(False), torch.enable_grad(), model_mode(model, "eval"):
        x0 = x.detach().clone().requires_grad_(True)
        loss = F.cross_entropy(model(x0), y.detach().clone(), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x0)
    return float((grad.flatten(1).abs().amax(1) == 0).sum()), float(x.shape[0])
