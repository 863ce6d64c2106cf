"""Projected gradient descent (Madry et al. 2018, arXiv 1706.06083) and FGSM (Goodfellow et al. 2015).

PGD maximizes the loss over the threat model by steepest ascent steps followed by projection:
``x_{t+1} = Proj_{B(x, eps) ∩ [0,1]^d}(x_t + alpha * s(grad))`` with ``s = sign`` for L-inf and
``s = g / ||g||_2`` for L2, from a random start in the ball, keeping per sample the strongest of
``restarts`` runs. FGSM is the single-step case; with a random start and ``alpha = 1.25 eps`` it is the
"fast adversarial training" attack of Wong, Rice & Kolter (2020, arXiv 2001.03994).

Both are also the additive "delta" component of :class:`~lightning_robust.attacks.Compose`
(``θ = δ``, ``x' = clip(x + δ)``, ``δ`` projected onto the ball).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_robust.attacks.base import Attack
from lightning_robust.attacks.color_spaces import clip
from lightning_robust.attacks.functional_base import Perturbation
from lightning_robust.attacks.threat import ThreatModel
from lightning_robust.utils.validation import check_non_negative, check_positive, check_positive_int

__all__ = ["FGSM", "PGD"]


def _toward(value: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` cast to ``dtype``, each entry rounded toward ``x`` instead of to nearest, so that
    ``|result - x| <= |value - x|`` elementwise: a projection onto a ball around ``x`` survives the cast."""
    r = value.detach().to(dtype)
    if r.dtype == value.dtype:
        return r.clone()
    xd, vd = x.detach().double(), value.detach().double()
    outward = (r.double() - xd).abs() > (vd - xd).abs()
    return torch.where(outward, torch.nextafter(r, xd.to(dtype)), r)


class PGD(Attack, Perturbation):
    """Projected gradient descent under an L-inf or L2 budget.

    Args:
        eps: radius of the ball (pixel units; 8/255 is the CIFAR-10 L-inf standard, 0.3 for MNIST).
        alpha: step size (default ``2.5 * eps / steps``, the Madry et al. rule of thumb).
        steps: number of gradient steps (>= 1).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a random point of the ball (else from ``x``).
        restarts: independent runs; per sample the most successful / highest-loss result is kept.
        loss: ``"ce"`` or ``"cw"`` (margin loss).
        targeted: ``y`` holds target labels.
        model_mode: ``"eval"``, ``"train"`` or ``"keep"``.
        kappa: confidence cap of the ``"cw"`` margin.
        low, high: input value bounds.

    Raises:
        ValueError: negative eps, non-positive alpha, zero steps or restarts, unknown norm or loss.

    Example:
        >>> attack = PGD(eps=8/255, alpha=2/255, steps=10, norm="linf", random_start=True)
        >>> x_adv = attack(model, x, y)
    """

    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        norm: str = "linf",
        random_start: bool = True,
        restarts: int = 1,
        loss: str = "ce",
        targeted: bool = False,
        model_mode: str = "eval",
        kappa: float = float("inf"),
        low: float = 0.0,
        high: float = 1.0,
    ) -> None:
        check_non_negative("eps", eps)
        check_positive_int("steps", steps)
        check_positive_int("restarts", restarts)
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be one of ['linf', 'l2'] for PGD, got {norm!r}")
        super().__init__(ThreatModel(norm, eps, low, high), loss=loss, targeted=targeted, model_mode=model_mode,
                         kappa=kappa)
        self.alpha = float(check_positive("alpha", alpha)) if alpha is not None else 2.5 * eps / steps
        self.steps = steps
        self.random_start = bool(random_start)
        self.restarts = restarts

    def _step_direction(self, grad: torch.Tensor) -> torch.Tensor:
        if self.threat.norm == "linf":
            return grad.sign()
        n = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        return grad / n.view(-1, *([1] * (grad.ndim - 1)))

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
        # Half-precision inputs are attacked on a float32 copy: x +- eps rounded to float16 can land outside
        # the ball (8/255 became 0.0315 > 0.03137), and small steps vanish in float16. The model sees the
        # iterate rounded toward x, so every input it gets, and the result, stay within eps of x.
        low = x.dtype in (torch.float16, torch.bfloat16)
        xw = x.float() if low else x
        x_adv = self.threat.random_start(xw, generator) if self.random_start else xw.clone()
        if self.threat.norm == "linf":
            # Ball ∩ box is a box: project with one max and one min against precomputed corners (rounded
            # toward x from the float64 values, so they never lie outside the ball).
            x64 = x.double()
            lo = _toward((x64 - self.threat.eps).clamp_(self.threat.low, self.threat.high), x64, xw.dtype)
            hi = _toward((x64 + self.threat.eps).clamp_(self.threat.low, self.threat.high), x64, xw.dtype)
        for _ in range(self.steps):
            inp = _toward(x_adv, x, x.dtype) if low else x_adv
            inp.requires_grad_(True)
            loss = self.loss_per_sample(model(inp), y).sum()
            (grad,) = torch.autograd.grad(loss, inp)
            with torch.no_grad():
                grad = grad.to(xw.dtype)
                if self.threat.norm == "linf":
                    x_adv = torch.minimum(torch.maximum(x_adv.detach().add_(grad.sign_(), alpha=self.alpha), lo), hi)
                else:
                    x_adv = self.threat.project(x_adv.detach() + self.alpha * self._step_direction(grad), xw)
        return _toward(x_adv.detach(), x, x.dtype) if low else x_adv

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        if self.restarts == 1:
            return self._run(model, x, y, generator)
        best = x.clone()
        best_success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
        for _ in range(self.restarts):
            cand = self._run(model, x, y, generator)
            with torch.no_grad():
                logits = model(cand)
                loss = self.loss_per_sample(logits, y)
                success = self.is_successful(logits, y)
            # A success beats a failure; between equals, the higher loss wins.
            better = (success & ~best_success) | ((success == best_success) & (loss > best_loss))
            best[better] = cand[better]
            best_loss = torch.where(better, loss, best_loss)
            best_success = best_success | success
        return best

    # ---- Perturbation interface (the additive "delta" of Compose) -------------------------------------
    def params_are_null(self) -> bool:
        return self.threat.eps == 0

    def init_params(self, x: torch.Tensor, random: bool, generator: torch.Generator | None) -> torch.Tensor:
        if not random:
            return torch.zeros_like(x)
        return self.threat.random_start(x, generator) - x

    def project_params(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.threat.project(x + params, x) - x

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return clip(x + params, self.threat.low, self.threat.high)


class FGSM(PGD):
    """Fast gradient sign method: one signed gradient step, optionally from a random start.

    ``FGSM(eps)`` is Goodfellow et al.'s attack (step ``eps`` from ``x``). ``FGSM(eps, random_start=True)``
    is the "fast adversarial training" variant of Wong et al. (2020): uniform start in the ball and step
    ``alpha = 1.25 eps`` (the default step when ``random_start`` is set), then projection.

    Args:
        eps: radius; alpha: step (defaults as above); norm: ``"linf"`` or ``"l2"``; others as in :class:`PGD`.

    Example:
        >>> x_adv = FGSM(eps=8/255, random_start=True)(model, x, y)
    """

    def __init__(
        self,
        eps: float = 8 / 255,
        alpha: float | None = None,
        norm: str = "linf",
        random_start: bool = False,
        loss: str = "ce",
        targeted: bool = False,
        model_mode: str = "eval",
        kappa: float = float("inf"),
        low: float = 0.0,
        high: float = 1.0,
    ) -> None:
        if alpha is None:
            alpha = (1.25 * eps if random_start else eps) or None
        super().__init__(eps=eps, alpha=alpha, steps=1, norm=norm, random_start=random_start, restarts=1,
                         loss=loss, targeted=targeted, model_mode=model_mode, kappa=kappa, low=low, high=high)
