"""Attacks from anywhere: plain callables and torchattacks objects behind the library's :class:`Attack` contract.

:func:`as_attack` is the one entry point. It returns

* the library's own :class:`Attack` objects unchanged;
* a :class:`ForeignAttack` around any callable ``attack(model, x, y) -> x_adv`` (cleverhans-style functions,
  a lambda around another library);
* a :class:`ForeignAttack` around a torchattacks object, which binds its model at construction: the adapter
  points it at the model it is called with (``set_model``) and puts the original back afterwards, so one
  object serves the module that a callback attacks.

A foreign attack is not trusted (Carlini et al. 2019, "On Evaluating Adversarial Robustness", arXiv
1902.06705): its output must be a tensor of the input's shape, dtype and device, finite, inside the threat
model's ball ``||x_adv - x|| <= eps`` (+ ``tol``) and the box ``[low, high]``; otherwise the call raises a
:class:`ForeignAttackError` that says which check failed and on how many samples. The library's contract is
enforced around it too: eval mode by default with every module's flag restored, parameter ``.grad`` left as
found, randomness drawn from the caller's ``generator`` (the global RNG is forked, so a foreign attack that
seeds it, as torchattacks' APGD does, leaves the caller's stream alone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_robust.attacks.base import Attack
from lightning_robust.attacks.threat import ThreatModel
from lightning_robust.utils.validation import check_finite

__all__ = ["ForeignAttack", "ForeignAttackError", "as_attack", "check_adversarial_output", "is_torchattacks"]

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


class ForeignAttackError(ValueError):
    """A foreign attack returned something that is not an honest adversarial example for its threat model."""


def is_torchattacks(obj: Any) -> bool:
    """True for a torchattacks attack object (checked without importing torchattacks)."""
    return any(c.__module__.split(".")[0] == "torchattacks" and c.__name__ == "Attack" for c in type(obj).__mro__)


def _torchattacks_threat(obj: Any) -> ThreatModel | None:
    """The threat model a torchattacks object states: its ``eps`` and its norm (attribute or class name)."""
    eps = getattr(obj, "eps", None)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None  # minimum-norm attacks (CW, DeepFool, ...) have no budget to check against
    norm = getattr(obj, "norm", None)
    if not isinstance(norm, str):
        name = type(obj).__name__.upper()
        norm = "l2" if "L2" in name else "l1" if "L1" in name else "linf"
    norm = norm.lower()
    if norm not in ("linf", "l2", "l1"):
        return None
    return ThreatModel(norm, float(eps))


def check_adversarial_output(x_adv: Any, x: torch.Tensor, threat: ThreatModel, tol: float = 1e-5,
                             name: str = "attack") -> torch.Tensor:
    """Return ``x_adv`` if it is an honest adversarial batch for ``x`` under ``threat``, else raise.

    Checks, in order: a tensor; the shape, dtype and device of ``x``; finite values; every sample inside
    the box ``[low, high]`` and within ``eps + tol`` of its clean input in the threat model's norm.

    Raises:
        ForeignAttackError: naming ``name``, the failed check and, for the last two, how many samples fail
            and by how much.
    """
    check_finite("x", x)
    if not torch.is_tensor(x_adv):
        raise ForeignAttackError(f"{name} returned {type(x_adv).__name__}, expected a tensor of shape "
                                 f"{tuple(x.shape)}")
    if x_adv.shape != x.shape:
        raise ForeignAttackError(f"{name} returned shape {tuple(x_adv.shape)}, expected the input's shape "
                                 f"{tuple(x.shape)}")
    if x_adv.dtype != x.dtype:
        raise ForeignAttackError(f"{name} returned dtype {x_adv.dtype}, expected the input's dtype {x.dtype}")
    if x_adv.device != x.device:
        raise ForeignAttackError(f"{name} returned a tensor on {x_adv.device}, expected the input's device "
                                 f"{x.device}")
    finite = torch.isfinite(x_adv).flatten(1).all(1)
    if not bool(finite.all()):
        raise ForeignAttackError(f"{name} returned NaN or inf in {int((~finite).sum())} of {x.shape[0]} samples")
    box = ((x_adv >= threat.low - tol) & (x_adv <= threat.high + tol)).flatten(1).all(1)
    if not bool(box.all()):
        lo, hi = float(x_adv.min()), float(x_adv.max())
        raise ForeignAttackError(f"{name} returned {int((~box).sum())} of {x.shape[0]} samples outside the value "
                                 f"box [{threat.low}, {threat.high}] (values span [{lo:.6g}, {hi:.6g}])")
    if threat.norm != "none":
        dist = threat.distance(x_adv, x)
        over = dist > threat.eps + tol
        if bool(over.any()):
            raise ForeignAttackError(f"{name} returned {int(over.sum())} of {x.shape[0]} samples outside the "
                                     f"{threat.norm} ball of radius eps={threat.eps:.6g} (largest distance "
                                     f"{float(dist.max()):.6g}); the robust accuracy would not be for the stated "
                                     "threat model")
    return x_adv


class ForeignAttack(Attack):
    """A callable or torchattacks object behind the :class:`Attack` contract, with honesty checks on its output.

    Prefer :func:`as_attack`, which picks this class when needed and reads a torchattacks object's threat
    model from its own ``eps`` and norm.

    Args:
        attack: ``attack(model, x, y) -> x_adv``, or a torchattacks object (called as ``attack(x, y)`` after
            ``attack.set_model(model)``).
        threat: the threat model the attack claims; its outputs are checked against it.
        tol: slack of the ball and box checks (float32 projections land a few ulps outside).
        name: how errors name the attack (default: its class or function name).
        model_mode: mode the model runs in during the attack (see :class:`Attack`).

    Raises:
        TypeError: if ``attack`` is not callable or ``threat`` is not a ThreatModel.
        ForeignAttackError: at call time, when the output fails a check (see
            :func:`check_adversarial_output`).

    Example:
        >>> def fgsm(model, x, y):
        ...     x = x.clone().requires_grad_(True)
        ...     (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
        ...     return (x + 0.1 * g.sign()).clamp(0, 1).detach()
        >>> attack = ForeignAttack(fgsm, ThreatModel("linf", 0.1))
    """

    def __init__(self, attack: AttackFn | Any, threat: ThreatModel, tol: float = 1e-5, name: str | None = None,
                 model_mode: str = "eval") -> None:
        if not callable(attack):
            raise TypeError(f"attack must be callable as attack(model, x, y) -> x_adv or a torchattacks object, "
                            f"got {type(attack).__name__}")
        super().__init__(threat, model_mode=model_mode)
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol >= 0:
            raise ValueError(f"tol must be a number >= 0, got {tol!r}")
        self.attack = attack
        self.tol = float(tol)
        self.name = name or getattr(attack, "__name__", None) or type(attack).__name__
        self._torchattacks = is_torchattacks(attack)

    def __repr__(self) -> str:
        return f"ForeignAttack({self.name}, {self.threat!r})"

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        grads = [(p, p.grad) for p in model.parameters()]
        devices = [x.device] if x.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                if generator is not None:
                    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator,
                                                        device=generator.device)))
                x_adv = self._call(model, x.clone(), y.clone())
        finally:
            for p, g in grads:  # the contract: parameters' .grad are left as found
                p.grad = g
        if torch.is_tensor(x_adv):
            x_adv = x_adv.detach()
        return check_adversarial_output(x_adv, x, self.threat, self.tol, name=f"attack {self.name!r}")

    def _call(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
        if not self._torchattacks:
            return self.attack(model, x, y)
        ta: Any = self.attack
        bound, device = ta.model, getattr(ta, "device", None)
        ta.set_model(model)
        ta.set_device(x.device)
        try:
            return ta(x, y)
        finally:
            ta.set_model(bound)
            ta.set_device(device)


def as_attack(obj: Any, threat: ThreatModel | None = None, *, tol: float = 1e-5, argument: str = "attack") -> Attack:
    """Wrap anything usable as an attack into the library's :class:`Attack` interface.

    * an :class:`Attack`: returned unchanged (``threat`` must then be ``None``);
    * a torchattacks object: a :class:`ForeignAttack` whose threat model is ``threat`` or, when ``None``,
      the object's own ``eps`` and norm (``norm`` attribute, else ``L2``/``L1`` in the class name, else
      L-inf), in [0, 1];
    * any other callable ``attack(model, x, y) -> x_adv``: a :class:`ForeignAttack` with ``threat`` (needed:
      a bare function does not say what it is allowed to do).

    Args:
        obj: the attack.
        threat: the threat model to check a foreign attack's outputs against.
        tol: slack of those checks.
        argument: the argument name used in error messages (e.g. ``"attacks['pgd']"``).

    Raises:
        TypeError: when ``threat`` is not a ThreatModel.
        ValueError: when ``obj`` is not callable, when a foreign attack's threat model is unknown (a callable
            without ``threat``, a minimum-norm torchattacks attack such as CW or DeepFool without ``threat``), or when
            ``threat`` is given for one of the library's own attacks.

    Example:
        >>> import torchattacks
        >>> attack = as_attack(torchattacks.PGD(net, eps=0.1, alpha=0.02, steps=20))
        >>> x_adv = attack(net, x, y)   # checked: within eps = 0.1 in L-inf and in [0, 1]
    """
    if threat is not None and not isinstance(threat, ThreatModel):
        raise TypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
    if isinstance(obj, Attack):
        if threat is not None and repr(threat) != repr(obj.threat):
            raise ValueError(f"{argument} is a library Attack with its own threat model {obj.threat!r}; do not "
                             f"pass threat={threat!r}")
        return obj
    if not callable(obj):  # ValueError, as the callbacks' other argument checks
        raise ValueError(f"{argument} must be an Attack, a torchattacks attack or a callable "
                        f"attack(model, x, y) -> x_adv, got {type(obj).__name__}")
    if threat is None and is_torchattacks(obj):
        threat = _torchattacks_threat(obj)
        if threat is None:
            raise ValueError(f"{argument} is a torchattacks {type(obj).__name__} without an eps budget; pass "
                             "as_attack(obj, threat=ThreatModel(norm, eps)) to state the threat model its outputs "
                             "are checked against")
    if threat is None:
        threat = getattr(obj, "threat", None)
    if not isinstance(threat, ThreatModel):
        raise ValueError(f"{argument} is a callable without a threat model; wrap it as "
                         "as_attack(fn, threat=ThreatModel(norm, eps)) so its outputs can be checked against "
                         "the budget")
    return ForeignAttack(obj, threat, tol=tol)
