"""The attack contract shared by every attack in the library.

An :class:`Attack` holds hyper-parameters only (never a model or a device); ``attack(model, x, y)``

* validates the inputs (images in the threat model's bounds, one label per sample);
* runs the model in eval mode by default (``model_mode="train"`` or ``"keep"`` to change that), and
  restores every submodule's training flag afterwards;
* computes input gradients with ``torch.autograd.grad`` only, so parameters' ``.grad`` are never touched;
* works inside ``torch.no_grad()`` and ``torch.inference_mode()`` (validation loops);
* draws randomness from an optional ``torch.Generator`` (``generator=`` keyword of the call);
* returns a detached tensor of the input's shape, inside the threat model and the value bounds;
* returns the input itself when the budget is zero (:meth:`Attack.is_null`).

Targeted attacks read ``y`` as target labels. The objective is cross-entropy or the Carlini-Wagner
margin (:func:`attack_loss`), optionally capped at a confidence ``kappa``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.attacks.threat import ThreatModel
from lightning_robust.utils.modules import MODEL_MODES, model_mode
from lightning_robust.utils.validation import check_choice, check_image_range

__all__ = ["LOSSES", "MODEL_MODES", "Attack", "attack_loss", "model_mode"]

LOSSES = ("ce", "cw")


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce", targeted: bool = False,
                kappa: float = float("inf")) -> torch.Tensor:
    """Per-sample loss that the attack *maximizes*.

    * ``"ce"``: cross-entropy of the true label (untargeted) or minus the cross-entropy of the target.
    * ``"cw"``: the Carlini-Wagner margin ``max_{j != y} z_j - z_y`` (untargeted) or ``z_t - max_{j != t} z_j``
      (targeted), optionally capped at ``kappa`` (confidence), so that samples already fooled by a
      margin of ``kappa`` stop pulling the step.
    """
    if not isinstance(kappa, (int, float)) or isinstance(kappa, bool) or not kappa > 0:
        raise ValueError(f"kappa must be a positive number or inf, got {kappa!r}")
    if loss == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if targeted else ce
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    margin = true - others if targeted else others - true
    return margin.clamp(max=kappa) if kappa != float("inf") else margin


class Attack(ABC):
    """Base class: hyper-parameters in the constructor, the algorithm in :meth:`perturb`.

    Args:
        threat: the :class:`ThreatModel` (norm, eps, bounds).
        loss: ``"ce"`` (cross-entropy) or ``"cw"`` (Carlini-Wagner margin).
        targeted: when True, ``y`` holds target labels and the attack pushes predictions toward them.
        model_mode: ``"eval"`` (default), ``"train"`` or ``"keep"``: the mode the model runs in during
            the attack; the original per-module flags are restored afterwards either way.
        kappa: confidence cap of the ``"cw"`` margin (``inf``: uncapped, the ReColorAdv setting).

    Subclasses implement ``perturb(model, x, y, generator)``: ``x`` is a detached copy of the input,
    gradients are enabled, the model is in the requested mode.
    """

    def __init__(self, threat: ThreatModel, loss: str = "ce", targeted: bool = False,
                 model_mode: str = "eval", kappa: float = float("inf")) -> None:
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
        self.threat = threat
        self.loss = check_choice("loss", loss, LOSSES)
        self.targeted = bool(targeted)
        self.model_mode = check_choice("model_mode", model_mode, MODEL_MODES)
        if not isinstance(kappa, (int, float)) or isinstance(kappa, bool) or not kappa > 0:
            raise ValueError(f"kappa must be a positive number or inf, got {kappa!r}")
        self.kappa = float(kappa)

    # Public hyper-parameters of the threat model, for logging and configs.
    @property
    def eps(self) -> float:
        return self.threat.eps

    @property
    def norm(self) -> str:
        return self.threat.norm

    def __repr__(self) -> str:
        fields = {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "threat"}
        inner = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"{type(self).__name__}(norm={self.norm!r}, eps={self.eps:.6g}, {inner})"

    def loss_per_sample(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The per-sample objective the attack maximizes (sign already set for targeted attacks)."""
        if y.numel() and int(y.max()) >= logits.shape[1]:
            # Out-of-range labels would index past the logits (a device-side assert on CUDA).
            raise ValueError(f"y holds class index {int(y.max())} but the model outputs {logits.shape[1]} classes")
        return attack_loss(logits, y, self.loss, self.targeted, self.kappa)

    def is_successful(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample success: misclassified (untargeted) or classified as the target (targeted)."""
        pred = logits.argmax(1)
        return pred == y if self.targeted else pred != y

    def is_null(self) -> bool:
        """True when the budget is zero, so that the only allowed input is ``x`` itself."""
        return self.threat.eps == 0 and self.threat.norm != "none"

    def within_budget(self, x_adv: torch.Tensor, x: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
        """Per-sample check that ``x_adv`` is an allowed output for ``x`` (used by honest-evaluation checks).

        L-p attacks check the ball and the box; functional attacks (whose budget lives on their own
        parameters) can only be checked against the box here.
        """
        return self.threat.contains(x_adv, x, tol=tol)

    def validate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Raise a clear error for inputs outside the bounds or labels of the wrong shape."""
        check_image_range("x", x, self.threat.low, self.threat.high)
        if x.ndim < 2:
            raise ValueError(f"x must be a batch [B, ...] with at least one feature dimension, got shape "
                             f"{tuple(x.shape)}")
        if not torch.is_tensor(y) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError("y must be an integer tensor of class labels")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have shape [{x.shape[0]}] (one label per sample), got {tuple(y.shape)}")
        if y.numel() and int(y.min()) < 0:
            raise ValueError(f"y must hold class indices >= 0, got {int(y.min())}")

    @staticmethod
    def check_model_dtype(model: nn.Module, x: torch.Tensor) -> None:
        """Raise if ``x`` and the model's floating parameters have different dtypes (outside autocast)."""
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        if param is None or param.dtype == x.dtype:
            return
        if torch.is_autocast_enabled(x.device.type):
            return  # mixed precision: autocast casts the inputs of each op
        raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {param.dtype}; convert x (or the "
                        "model) so they match")

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Return adversarial examples for ``(x, y)`` against ``model`` (see the module docstring)."""
        self.validate(x, y)
        if x.shape[0] == 0:
            return x.detach().clone()  # an empty batch has no adversarial examples to find
        self.check_model_dtype(model, x)
        # Validation loops may run under inference_mode, whose tensors cannot enter autograd: leave it,
        # and clone so that the attack owns a normal tensor.
        with torch.inference_mode(False), torch.enable_grad(), model_mode(model, self.model_mode):
            x0 = x.detach().clone()
            y0 = y.detach().clone().long()
            if self.is_null():
                return x0
            x_adv = self.perturb(model, x0, y0, generator)
        return x_adv.detach()

    @abstractmethod
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        """The attack algorithm (gradients enabled, model in the requested mode)."""
