"""Functional threat models (Laidlaw & Feizi 2019, arXiv 1906.00001) and the optimizer they share.

A functional attack perturbs an input through a parameterized function, ``x' = g(x; θ)``, with a
feasible set for ``θ`` (a budget on the function, not on the pixels) and a regularizer ``R(θ)`` that
keeps the function smooth. The attack solves

    max_θ  L_adv(f(g(x; θ)), y) - λ R(θ)      subject to  θ ∈ Θ,

with Adam (the paper: 100 steps, learning rate 0.001) or signed-gradient steps, projecting ``θ`` back
onto ``Θ`` after every step and keeping, per sample, the best iterate: by default the one with the
highest regularized objective, as the authors' code does (``keep_best="regularized"``), or a successful
one over a failed one, then the higher objective (``keep_best="success"``). :class:`Perturbation` is
the interface of one such component (ReColorAdv's colour grid, StAdv's flow field, PGD's additive
delta); :func:`optimize_perturbations` optimizes a chain of them jointly, which is how
:class:`~lightning_robust.attacks.Compose` builds the paper's strongest attack, ReColorAdv + StAdv + delta.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lightning_robust.attacks.base import Attack
from lightning_robust.attacks.threat import ThreatModel
from lightning_robust.utils.validation import check_choice, check_finite, check_positive, check_positive_int

__all__ = ["KEEP_BEST", "OPTIMIZERS", "FunctionalAttack", "Perturbation", "apply_chain", "neighbour_smoothness",
           "optimize_perturbations"]

OPTIMIZERS = ("adam", "sign")
KEEP_BEST = ("regularized", "success")


class _NeighbourSmoothness(torch.autograd.Function):
    """Forward and backward of :func:`neighbour_smoothness` in a few in-place passes.

    Autograd's generic graph for ``diff -> square -> sum -> sqrt -> sum`` allocates and zero-fills a
    full-size buffer per node; on the paper's 16x32x32 colour grids this term dominated an attack step.
    The forward keeps, per axis, only the unit differences ``u = d / ||d||_eps`` (computed in place in the
    difference's own buffer), so the backward is two shifted additions per axis into one uninitialised
    buffer and a single scaling by the per-sample output gradient (half the time of scaling each axis).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, params: torch.Tensor, axes: tuple[int, ...],
                eps: float) -> torch.Tensor:
        total = params.new_zeros(params.shape[0])
        saved = []
        for axis in axes:
            d = params.diff(dim=axis)
            # ||d||^2 over the channels in one pass (vecdot), no full-size square temporary.
            n = torch.linalg.vecdot(d, d, dim=1).unsqueeze(1).add_(eps).sqrt_()
            total += n.flatten(1).sum(1)
            saved.append(d.div_(n))
        ctx.axes = axes  # type: ignore[attr-defined]
        ctx.shape = params.shape  # type: ignore[attr-defined]
        ctx.save_for_backward(*saved)
        return 2 * total

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 *grad_outputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (g,) = grad_outputs
        saved = ctx.saved_tensors  # type: ignore[attr-defined]
        out = saved[0].new_empty(ctx.shape)  # type: ignore[attr-defined]
        for i, axis in enumerate(ctx.axes):  # type: ignore[attr-defined]
            # d/dθ of Σ ||θ_{i+1} - θ_i||: +u at i+1, -u at i (times 2 g, applied once at the end).
            u = saved[i]
            size = out.shape[axis]
            if i == 0:  # the first axis initialises the buffer: no zero fill
                out.narrow(axis, 1, size - 1).copy_(u)
                out.narrow(axis, 0, 1).zero_()
            else:
                out.narrow(axis, 1, size - 1).add_(u)
            out.narrow(axis, 0, size - 1).sub_(u)
        return out.mul_(2 * g.view(-1, *([1] * (out.ndim - 1)))), None, None


def neighbour_smoothness(params: torch.Tensor, axes: Sequence[int], eps: float = 1e-10) -> torch.Tensor:
    """Per-sample ``Σ_g Σ_{h ∈ N(g)} sqrt(||θ_g - θ_h||² + eps)`` over axis neighbours of a grid.

    ``params`` is ``[B, C, *grid]``: the norm runs over the channel dimension ``C``; ``N(g)`` are the
    neighbours of node ``g`` along ``axes``, each adjacent pair counted from both sides (the penalty of
    the ReColorAdv code and of StAdv's flow loss; the ``sqrt(eps)`` constants of the border are left out).
    Differentiable (first order).
    """
    out: torch.Tensor = _NeighbourSmoothness.apply(params, tuple(axes), float(eps))
    return out


class Perturbation(ABC):
    """One parameterized perturbation ``x' = apply(x, θ)``: the unit :class:`Compose` chains.

    Implementations keep ``θ`` per sample (first dimension = batch) so that every sample's attack is
    independent of the rest of the batch. ``smoothness_weight`` is the λ of the regularizer.
    """

    smoothness_weight: float = 0.0

    @abstractmethod
    def init_params(self, x: torch.Tensor, random: bool, generator: torch.Generator | None) -> torch.Tensor:
        """The starting ``θ`` for inputs ``x``: the identity, or a random feasible point when ``random``."""

    @abstractmethod
    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """The perturbed inputs (differentiable in ``x`` and ``params``), inside the value bounds."""

    @abstractmethod
    def project_params(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The feasible ``θ`` nearest to ``params`` for the component's input ``x`` (clipping for boxes).

        ``x`` matters to components whose feasible set depends on the input, such as an additive delta
        that must keep ``x + δ`` inside the value bounds (so it never sits where the clip kills its
        gradient).
        """

    def regularizer(self, params: torch.Tensor) -> torch.Tensor:
        """Per-sample ``R(θ)`` ([B]); zero unless the component has a smoothness penalty."""
        return params.new_zeros(params.shape[0])

    def params_are_null(self) -> bool:
        """True when the feasible set is ``{identity}`` (a zero budget)."""
        return False


def apply_chain(components: Sequence[Perturbation], x: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """Apply the components in order: ``g_K(... g_1(x; θ_1) ...; θ_K)``."""
    out = x
    for comp, p in zip(components, params):
        out = comp.apply(out, p)
    return out


@torch.no_grad()
def _project_chain(components: Sequence[Perturbation], x: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """Project every component's parameters in place, each for the input it currently receives."""
    inp = x
    for i, (comp, p) in enumerate(zip(components, params)):
        p.copy_(comp.project_params(p, inp))
        if i + 1 < len(components):
            inp = comp.apply(inp, p)


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    # The fused kernel is several times faster on the large colour grids; fall back where unsupported.
    try:
        return torch.optim.Adam(params, lr=lr, maximize=True, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr, maximize=True)


class _InputsAs(nn.Module):
    """``model`` fed its inputs cast to ``dtype`` (differentiably): a float32 chain in front of a half model."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z.to(self.dtype))


def optimize_perturbations(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    components: Sequence[Perturbation],
    objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    success: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    steps: int,
    lr: float,
    optimizer: str = "adam",
    random_start: bool = False,
    generator: torch.Generator | None = None,
    keep_best: str = "regularized",
) -> torch.Tensor:
    """Jointly optimize the parameters of a chain of perturbations; return the best perturbed inputs.

    Maximizes ``objective(logits, y) - Σ_k λ_k R_k(θ_k)`` per sample over ``steps`` steps of Adam
    (``optimizer="adam"``, learning rate ``lr``) or signed gradient ascent (``"sign"``, step ``lr``),
    projecting each ``θ_k`` after every step. Every iterate (the start included) is scored, and per
    sample one is returned:

    * ``keep_best="regularized"`` (the authors' code, ``keep_best=True`` of mister_ed's PGD): the iterate
      with the highest regularized objective, successful or not. A successful iterate with a rough
      function can lose to a smoother failed one; it never loses to the identity start, since the
      penalty is smallest there. (mister_ed scores the parameters *before* each step but stores those
      *after* it; here each iterate is stored with its own score.)
    * ``keep_best="success"``: a successful iterate beats a failed one; among successes the highest
      regularized objective wins, among failures the highest attack objective.

    Gradients flow to the parameters only, through ``torch.autograd.grad``.

    Args:
        model: maps inputs to logits (already in the mode the caller wants).
        x, y: clean inputs and labels (targets for targeted attacks; ``objective`` knows which).
        components: the perturbations, applied in order.
        objective: per-sample attack objective to maximize, ``(logits, y) -> [B]``.
        success: per-sample success, ``(logits, y) -> BoolTensor[B]``.
        steps, lr, optimizer, random_start, generator, keep_best: as described above.
    """
    check_finite("x", x)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("keep_best", keep_best, KEEP_BEST)
    if x.dtype in (torch.float16, torch.bfloat16):
        # Half-precision inputs: every component's parameters and the chain run on a float32 copy (Adam's
        # eps 1e-8 underflows to 0 in float16, so a zero gradient became 0/0 = NaN, and steps of ~1e-3 vanish
        # against bfloat16's resolution); the model sees its own dtype and the result comes back in x's.
        return optimize_perturbations(_InputsAs(model, x.dtype), x.float(), y, components, objective, success,
                                      steps, lr, optimizer, random_start, generator, keep_best).to(x.dtype)
    by_success = keep_best == "success"
    params = [c.init_params(x, random_start, generator).detach() for c in components]
    _project_chain(components, x, params)
    for p in params:
        p.requires_grad_(True)
    opt = _adam(params, lr) if optimizer == "adam" else None
    best = [p.detach().clone() for p in params]
    best_success = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    best_obj = torch.full((x.shape[0],), float("-inf"), device=x.device)
    for step in range(steps + 1):
        logits = model(apply_chain(components, x, params))
        adversarial = objective(logits, y)
        total = adversarial
        for comp, p in zip(components, params):
            if comp.smoothness_weight:
                total = total - comp.smoothness_weight * comp.regularizer(p)
        with torch.no_grad():
            if by_success:
                ok = success(logits, y)
                # A success beats a failure; among successes the smoothest (highest regularized
                # objective) wins, among failures the strongest (highest attack loss): the penalty guides
                # the search but must not make a failed attack fall back to the identity.
                score = torch.where(ok, total.detach(), adversarial.detach())
                better = (ok & ~best_success) | ((ok == best_success) & (score > best_obj))
                best_success |= ok
            else:
                score = total.detach()
                better = score > best_obj
            for b, p in zip(best, params):
                b[better] = p.detach()[better]
            best_obj = torch.where(better, score, best_obj)
        if step == steps:
            break
        grads = torch.autograd.grad(total.sum(), params)
        with torch.no_grad():
            if opt is not None:
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
            else:
                for p, g in zip(params, grads):
                    p.add_(lr * g.sign())
            _project_chain(components, x, params)
    with torch.no_grad():
        return apply_chain(components, x, best)


class FunctionalAttack(Attack):
    """Base of the functional attacks: the optimizer's hyper-parameters; subclasses name the components.

    Args:
        steps: optimization steps (the paper: 100).
        lr: Adam learning rate, or the step of signed gradient ascent (the paper: 0.001 with Adam).
        optimizer: ``"adam"`` (the paper) or ``"sign"``.
        random_start: start from a random feasible function instead of the identity.
        keep_best: which iterate each sample returns: ``"regularized"`` (the authors' code: the highest
            regularized objective) or ``"success"`` (a successful iterate first); see
            :func:`optimize_perturbations`.
        loss: ``"cw"`` (the paper's Carlini-Wagner margin, uncapped) or ``"ce"``.
        targeted, model_mode, kappa: as in :class:`~lightning_robust.attacks.Attack`.
        low, high: input value bounds.

    Raises:
        ValueError: on zero steps, a non-positive learning rate or an unknown optimizer, loss or
            ``keep_best`` rule.
    """

    def __init__(
        self,
        steps: int = 100,
        lr: float = 0.001,
        optimizer: str = "adam",
        random_start: bool = False,
        loss: str = "cw",
        targeted: bool = False,
        model_mode: str = "eval",
        kappa: float = float("inf"),
        low: float = 0.0,
        high: float = 1.0,
        keep_best: str = "regularized",
    ) -> None:
        super().__init__(ThreatModel("none", 0.0, low, high), loss=loss, targeted=targeted, model_mode=model_mode,
                         kappa=kappa)
        self.keep_best = check_choice("keep_best", keep_best, KEEP_BEST)
        self.steps = check_positive_int("steps", steps)
        self.lr = float(check_positive("lr", lr))
        self.optimizer = check_choice("optimizer", optimizer, OPTIMIZERS)
        self.random_start = bool(random_start)

    @abstractmethod
    def components(self) -> list[Perturbation]:
        """The perturbations optimized jointly, in the order they are applied."""

    def is_null(self) -> bool:
        return all(c.params_are_null() for c in self.components())

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        return optimize_perturbations(model, x, y, self.components(), self.loss_per_sample, self.is_successful,
                                      steps=self.steps, lr=self.lr, optimizer=self.optimizer,
                                      random_start=self.random_start, generator=generator,
                                      keep_best=self.keep_best)
