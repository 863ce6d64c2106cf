"""TRADES: the robustness term of Zhang et al. (ICML 2019, arXiv 1901.08573).

``β · max_{x' ∈ B(x, ε)} KL(f(x) ‖ f(x'))`` with the KL between the softmax outputs averaged over the
batch; the natural term ``CE(f(x), y)`` is a separate :class:`~lightning_robust.objectives.CrossEntropy`, so
TRADES is ``objectives=[CrossEntropy(), TRADES(beta=6.0)]``. The inner maximisation follows the authors'
code (yaodongyu/TRADES): start at ``x + 0.001 · N(0, I)``, ``steps`` signed-gradient (L-inf) or normalised
gradient (L2) ascent steps on the summed KL with the model in eval mode, projection onto the ball and
``[low, high]`` after each step; ``f(x)`` is a constant during the search. Paper (CIFAR-10): ε = 0.031,
step 0.007, 10 steps, β = 6.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.attacks.threat import ThreatModel
from lightning_robust.objectives.base import Objective, ObjectiveOutput, TrainingBatch
from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.validation import check_choice, check_non_negative, check_positive, check_positive_int

__all__ = ["TRADES"]


class TRADES(Objective):
    """``beta ·`` the batch-mean KL between the predictions on ``x`` and on the KL-maximising ``x'``.

    Logs ``trades_kl`` (the unweighted KL). The found ``x'`` is left in ``batch.cache["trades_inputs"]``.

    Args:
        beta: weight of the robustness term (paper: 6; 1/λ in its notation).
        eps: radius of the ball (paper: 0.031, L-inf).
        step_size: ascent step (paper: 0.007).
        steps: ascent steps (paper: 10).
        norm: ``"linf"`` or ``"l2"``.
        low, high: the input box.

    Example:
        >>> Classifier(net, objectives=[CrossEntropy(), TRADES(beta=6.0, eps=0.1, step_size=0.025, steps=10)])
    """

    def __init__(self, beta: float = 6.0, eps: float = 0.031, step_size: float = 0.007, steps: int = 10,
                 norm: str = "linf", low: float = 0.0, high: float = 1.0) -> None:
        self.beta = float(check_non_negative("beta", beta))
        self.step_size = float(check_positive("step_size", step_size))
        self.steps = check_positive_int("steps", steps)
        self.threat = ThreatModel(check_choice("norm", norm, ("linf", "l2")), eps, low, high)

    def maximize_kl(self, module: nn.Module, batch: TrainingBatch, p_natural: torch.Tensor) -> torch.Tensor:
        """The authors' inner loop: ascend ``sum KL(p_natural ‖ f(x'))`` from a small Gaussian start."""
        x = batch.x.detach()
        noise = torch.randn(x.shape, generator=batch.generator, device=x.device, dtype=x.dtype)
        x_adv = self.threat.project(x + 0.001 * noise, x)
        with torch.enable_grad(), model_mode(module, "eval"):
            for _ in range(self.steps):
                x_adv = x_adv.detach().requires_grad_(True)
                kl = F.kl_div(F.log_softmax(batch.forward(module, x_adv), dim=1), p_natural, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
                if self.threat.norm == "linf":
                    step = grad.sign()
                else:
                    step = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.ndim - 1)))
                x_adv = self.threat.project(x_adv.detach() + self.step_size * step, x)
        return x_adv.detach()

    def __call__(self, module: nn.Module, batch: TrainingBatch) -> ObjectiveOutput:
        if self.beta == 0:
            return torch.zeros((), device=batch.x.device, dtype=batch.x.dtype), {}
        natural = batch.forward(module, batch.x)
        x_adv = self.maximize_kl(module, batch, F.softmax(natural.detach(), dim=1))
        batch.cache["trades_inputs"] = x_adv
        kl = F.kl_div(F.log_softmax(batch.forward(module, x_adv), dim=1), F.softmax(natural, dim=1),
                      reduction="batchmean")
        return self.beta * kl, {"trades_kl": kl.detach()}
