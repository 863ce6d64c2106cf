"""Clean-label poisons that the Deep k-NN filter (Peri et al., arXiv 1909.13374) defends against.

* :class:`FeatureCollision` — "Poison Frogs!" (Shafahi et al., arXiv 1804.00792): a poison ``x`` that looks
  like a base image ``b`` (of the base class, and labelled so) but collides with a target ``t`` (of another
  class) in feature space, ``argmin_x ||f(x) - f(t)||^2 + beta ||x - b||^2``, solved by forward-backward
  splitting (a gradient step on the feature term, a proximal step on the image term); ``beta`` is
  ``beta0 * (d_feat / d_in)^2`` for pixels in [0, 255] as in the paper; an optional watermark blends the
  target into the base first.
* :class:`ConvexPolytope` — Zhu et al. (arXiv 1905.05897): k poisons whose features, for every network of an
  ensemble, hold the target's features inside their convex hull:
  ``min_{x, c} sum_i ||phi_i(t) - sum_j c_ij phi_i(x_j)||^2 / (2 ||phi_i(t)||^2)`` with ``c_i`` on the
  simplex and ``||x_j - b_j||_inf <= eps``.

Fine-tuning a classifier on a training set that contains the poisons (with their clean labels) then moves
the target to the base class. Both attacks hold hyper-parameters only; a call takes the feature extractor(s),
the base images and the target, and returns the poisons (detached, in [0, 1], shaped like the bases).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from lightning_robust.utils.feature_extractor import FeatureExtractor
from lightning_robust.utils.modules import MODEL_MODES, model_mode, resolve_layer
from lightning_robust.utils.validation import (
    check_choice,
    check_finite,
    check_fraction,
    check_image_range,
    check_non_negative,
    check_positive,
    check_positive_int,
)

__all__ = [
    "COEFFICIENT_SOLVERS",
    "ConvexPolytope",
    "FeatureCollision",
    "LayerFeatures",
    "PoisonAttack",
    "convex_polytope_loss",
    "nearest_to_target",
    "project_simplex",
    "simplex_least_squares",
    "simplex_projected_gradient",
]

class LayerFeatures(nn.Module):
    """``nn.Module`` returning the (flattened, differentiable) output of ``model``'s layer ``layer``.

    Turns a classifier and a dotted layer name into the feature extractor the poisons optimise against.

    Args:
        model: any ``nn.Module``.
        layer: dotted name of the feature layer, e.g. ``"classifier.3"`` for ``SmallCNN`` or ``"pool"``
            for the CIFAR ResNets.

    Raises:
        ValueError: if the layer does not exist (the message lists valid names).

    Example:
        >>> f = LayerFeatures(net, net.feature_layer)
        >>> f(images).shape          # [batch, features]
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        super().__init__()
        resolve_layer(model, layer)
        self.model = model
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with FeatureExtractor(self.model, self.layer, detach=False) as fx:
            self.model(x)
            return fx.features


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` (last dimension) onto the probability simplex.

    The sort-based algorithm of Held et al. / Duchi et al.: ``w = max(v - theta, 0)`` with ``theta`` chosen so
    that ``sum(w) = 1``.
    """
    check_finite("v", v)
    u = torch.sort(v, dim=-1, descending=True).values
    css = u.cumsum(-1) - 1.0
    ind = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    cond = (u - css / ind) > 0
    rho = cond.to(v.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp(min=0)


def _simplex_lstsq_exact(gram: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
    """Exact minimiser of ``c^T G c - 2 h^T c`` on the simplex by enumerating supports (small k only).

    For every non-empty support ``S`` the KKT system of the equality-constrained problem on ``S`` is solved
    (all in one batched solve); the optimum is the best solution that is non-negative, since the support of
    the true optimum yields it and every other non-negative solution is a feasible point.
    """
    k = gram.shape[0]
    masks = ((torch.arange(1, 2**k, device=gram.device).unsqueeze(1) >> torch.arange(k, device=gram.device)) & 1)
    s = masks.to(gram.dtype)  # [2^k - 1, k]
    ridge = 1e-12 * float(gram.diagonal().mean().clamp(min=1e-30))
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    m = torch.zeros(s.shape[0], k + 1, k + 1, dtype=gram.dtype, device=gram.device)
    # Rows outside the support pin c_j = 0; inside, (G + ridge) c + lam * 1 = h.
    m[:, :k, :k] = (gram + ridge * eye) * s.unsqueeze(2) * s.unsqueeze(1) + torch.diag_embed(1.0 - s)
    m[:, :k, k] = s
    m[:, k, :k] = s
    rhs = torch.cat([lin.unsqueeze(0) * s, torch.ones(s.shape[0], 1, dtype=gram.dtype, device=gram.device)], 1)
    sol = torch.linalg.solve(m, rhs.unsqueeze(2)).squeeze(2)[:, :k] * s
    obj = torch.einsum("bi,ij,bj->b", sol, gram, sol) - 2.0 * sol @ lin
    feasible = (sol >= -1e-10).all(1) & torch.isfinite(obj)
    best = torch.where(feasible, obj, torch.full_like(obj, float("inf"))).argmin()
    return sol[best].clamp(min=0) / sol[best].clamp(min=0).sum()


def simplex_least_squares(
    features: torch.Tensor,
    target: torch.Tensor,
    init: torch.Tensor | None = None,
    steps: int = 1000,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Coefficients ``c`` on the simplex minimising ``||features^T c - target||^2`` (CP's inner problem).

    Up to 10 poisons the problem is solved exactly by enumerating the supports (one batched KKT solve);
    beyond, by accelerated projected gradient (FISTA, the authors use projected gradient) with step ``1 / L``,
    ``L`` the largest eigenvalue of ``features features^T``, warm-started from ``init`` and stopped when the
    relative change of ``c`` falls below ``tol``.

    Args:
        features: ``[k, d]`` one feature row per poison.
        target: ``[d]`` target features.
        init: ``[k]`` starting coefficients for the iterative solver (default uniform).
        steps: maximum iterations of the iterative solver.
        tol: its relative-change stopping tolerance.
    """
    check_finite("features", features)
    check_finite("target", target)
    check_finite("init", init)
    check_positive_int("steps", steps)
    check_non_negative("tol", tol)
    f = features.detach().double().flatten(1)
    t = target.detach().double().flatten()
    k = f.shape[0]
    gram = f @ f.T
    lin = f @ t
    if k <= 10:
        return _simplex_lstsq_exact(gram, lin).to(features.dtype)
    lip = float(torch.linalg.eigvalsh(gram).max().clamp(min=1e-12))
    c = project_simplex(init.detach().double().flatten()) if init is not None else torch.full(
        (k,), 1.0 / k, dtype=torch.float64, device=f.device)
    z, s = c.clone(), 1.0
    for _ in range(steps):
        c_new = project_simplex(z - (gram @ z - lin) / lip)
        s_new = (1.0 + math.sqrt(1.0 + 4.0 * s * s)) / 2.0
        z = c_new + ((s - 1.0) / s_new) * (c_new - c)
        done = float((c_new - c).norm()) / max(float(c.norm()), 1e-8) < tol
        c, s = c_new, s_new
        if done:
            break
    return c.to(features.dtype)


def convex_polytope_loss(
    poison_features: Sequence[torch.Tensor], target_features: Sequence[torch.Tensor],
    coefficients: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``sum_i ||phi_i(t) - c_i^T phi_i(X)||^2 / (2 ||phi_i(t)||^2)`` over the ensemble."""
    check_finite("poison_features", poison_features)
    check_finite("target_features", target_features)
    check_finite("coefficients", coefficients)
    total = torch.zeros((), device=poison_features[0].device)
    for feats, tgt, c in zip(poison_features, target_features, coefficients):
        resid = tgt.flatten() - (c.view(-1, 1) * feats.flatten(1)).sum(0)
        total = total + 0.5 * resid.pow(2).sum() / tgt.pow(2).sum().clamp(min=1e-12)
    return total


@torch.no_grad()
def nearest_to_target(feature_extractor: nn.Module, candidates: torch.Tensor, target: torch.Tensor, num: int,
                      batch_size: int = 256) -> torch.Tensor:
    """Indices of the ``num`` candidates closest to ``target`` in feature space (nearest first).

    Poison Frogs picks the base closest to the target in feature space; CP offers the same ("--nearest").
    """
    check_finite("candidates", candidates)
    check_finite("target", target)
    check_positive_int("num", num)
    if num > candidates.shape[0]:
        raise ValueError(f"num must be at most the number of candidates ({candidates.shape[0]}), got {num}")
    with model_mode(feature_extractor, "eval"):
        ft = feature_extractor(target.view(1, *candidates.shape[1:])).flatten(1)
        dist = torch.cat([(feature_extractor(chunk).flatten(1) - ft).norm(dim=1)
                          for chunk in candidates.split(batch_size)])
    return torch.sort(dist, stable=True).indices[:num]


class PoisonAttack(ABC):
    """Base of the clean-label poison attacks: hyper-parameters only; ``attack(extractor, base, target)``.

    * ``base``: ``[k, C, H, W]`` images of the base class in [0, 1] (one poison per base);
    * ``target``: ``[C, H, W]`` or ``[1, C, H, W]``, the test image to be misclassified as the base class;
    * the extractor(s) run in eval mode by default (each submodule's flag is restored afterwards);
      gradients flow only to the images (``torch.autograd.grad``), parameters' ``.grad`` stay untouched;
      the call works inside ``torch.no_grad()`` and ``torch.inference_mode()``.

    Args:
        model_mode: ``"eval"`` (default), ``"train"`` or ``"keep"`` for the extractors during crafting.
    """

    def __init__(self, model_mode: str = "eval") -> None:
        self.model_mode = check_choice("model_mode", model_mode, MODEL_MODES)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({inner})"

    def __call__(self, feature_extractor: nn.Module | Sequence[nn.Module], base: torch.Tensor,
                 target: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return poisons shaped like ``base`` (detached, in [0, 1])."""
        given = list(feature_extractor) if isinstance(feature_extractor, (list, tuple)) else [feature_extractor]
        if not given or not all(isinstance(e, nn.Module) for e in given):
            raise TypeError("feature_extractor must be an nn.Module or a non-empty sequence of nn.Modules")
        extractors: list[nn.Module] = [e for e in given if isinstance(e, nn.Module)]
        check_image_range("base", base)
        check_image_range("target", target)
        if base.ndim < 2 or base.shape[0] == 0:
            raise ValueError(f"base must be a batch [k, ...] of at least one image, got shape {tuple(base.shape)}")
        if target.shape != base.shape[1:] and target.shape != (1, *base.shape[1:]):
            raise ValueError(f"target must have shape {tuple(base.shape[1:])} (one image like the bases), "
                             f"got {tuple(target.shape)}")
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            for e in extractors:
                stack.enter_context(model_mode(e, self.model_mode))
            b = base.detach().clone()
            t = target.detach().clone().view(1, *base.shape[1:])
            poisons = self.craft(extractors, b, t, generator)
        return poisons.detach()

    @abstractmethod
    def craft(self, extractors: list[nn.Module], base: torch.Tensor, target: torch.Tensor,
              generator: torch.Generator | None) -> torch.Tensor:
        """The algorithm (gradients enabled, extractors in the requested mode)."""


def _feature_grad(f: nn.Module, x: torch.Tensor, ft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``||f(x) - ft||^2`` and its gradient w.r.t. ``x`` (parameters untouched)."""
    x = x.detach().requires_grad_(True)
    loss = (f(x).flatten(1) - ft).pow(2).sum(1)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


class FeatureCollision(PoisonAttack):
    """Feature-collision poisons (Shafahi et al., "Poison Frogs!", arXiv 1804.00792, Algorithm 1).

    Each base ``b`` becomes a poison ``x`` by forward-backward splitting:

    * forward: ``x_hat = x - lr * grad_x ||f(x) - f(t)||^2``;
    * backward (proximal step of the image term): ``x = (x_hat + lr * beta * b) / (1 + lr * beta)``;

    then clipped to [0, 1] (and to ``||x - b||_inf <= eps`` when ``eps`` is set). As in the authors' code, a
    step that raises the objective is rejected and that poison's step size multiplied by ``decay``. The
    update is the paper's; its fixed points minimise ``||f(x) - f(t)||^2 + (beta / 2) ||x - b||^2``.

    ``beta`` defaults to the paper's ``beta0 * (d_feat / d_in)^2`` (``beta0 = 0.25``; 2048-d Inception
    features over 299x299x3 inputs in the paper) for pixels in [0, 255]; our images are in [0, 1], so the
    penalty on them is multiplied by ``pixel_scale^2`` (``pixel_scale = 255``). Pass ``beta`` to set the
    [0, 1]-pixel coefficient directly.

    Watermarking (the paper's end-to-end setting) first blends the target into the base with opacity
    ``gamma``: ``b <- (1 - gamma) b + gamma t``; the poison starts at, and is pulled toward, this image.

    Args:
        steps: forward-backward iterations.
        lr: initial forward step size (per poison; shrinks by ``decay`` on a rejected step).
        beta0: the paper's similarity weight before dimension scaling.
        beta: explicit coefficient for [0, 1] pixels (overrides ``beta0``).
        pixel_scale: the pixel range ``beta0`` refers to (255: the paper's 0..255 pixels).
        opacity: watermark opacity ``gamma`` in [0, 1) (paper: up to 0.3 end-to-end; 0 = off).
        eps: optional L-inf bound on ``x - b``; ``None`` (the paper) leaves only the proximal pull.
        decay: step-size factor after a rejected step, in (0, 1).
        model_mode: mode of the feature extractor while crafting.

    Raises:
        ValueError: on a non-positive step count, step size or weight, or an opacity outside [0, 1).

    Example:
        >>> attack = FeatureCollision(steps=500, lr=0.01, opacity=0.3)
        >>> poisons = attack(LayerFeatures(net, "classifier.3"), bases, target)
    """

    def __init__(
        self,
        steps: int = 1000,
        lr: float = 0.01,
        beta0: float = 0.25,
        beta: float | None = None,
        pixel_scale: float = 255.0,
        opacity: float = 0.0,
        eps: float | None = None,
        decay: float = 0.5,
        model_mode: str = "eval",
    ) -> None:
        super().__init__(model_mode)
        self.steps = check_positive_int("steps", steps)
        self.lr = check_positive("lr", lr)
        self.beta0 = check_non_negative("beta0", beta0)
        self.beta = None if beta is None else check_non_negative("beta", beta)
        self.pixel_scale = check_positive("pixel_scale", pixel_scale)
        self.opacity = check_fraction("opacity", opacity)
        self.eps = None if eps is None else check_positive("eps", eps)
        self.decay = check_fraction("decay", decay, inclusive_low=False)

    def effective_beta(self, d_feat: int, d_in: int) -> float:
        """The coefficient of ``||x - b||^2`` for [0, 1] pixels."""
        if self.beta is not None:
            return self.beta
        return self.beta0 * (d_feat / d_in) ** 2 * self.pixel_scale**2

    def craft(self, extractors: list[nn.Module], base: torch.Tensor, target: torch.Tensor,
              generator: torch.Generator | None) -> torch.Tensor:
        if len(extractors) != 1:
            raise ValueError(f"FeatureCollision takes one feature extractor, got {len(extractors)}")
        f = extractors[0]
        with torch.no_grad():
            ft = f(target).flatten(1).detach()
        anchor = (1.0 - self.opacity) * base + self.opacity * target
        beta = self.effective_beta(ft.shape[1], base[0].numel())
        shape = (-1,) + (1,) * (base.ndim - 1)
        lr = torch.full((base.shape[0],), self.lr, dtype=base.dtype, device=base.device)

        def project(x: torch.Tensor) -> torch.Tensor:
            if self.eps is not None:
                x = base + (x - base).clamp(-self.eps, self.eps)
            return x.clamp(0.0, 1.0)

        def objective(feat_loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return feat_loss + 0.5 * beta * (x - anchor).flatten(1).pow(2).sum(1)

        x = project(anchor.clone())
        feat_loss, grad = _feature_grad(f, x, ft)
        obj = objective(feat_loss, x)
        for _ in range(self.steps):
            step = lr.view(shape)
            x_hat = x - step * grad
            x_new = project((x_hat + step * beta * anchor) / (1.0 + step * beta))
            new_loss, new_grad = _feature_grad(f, x_new, ft)
            new_obj = objective(new_loss, x_new)
            accept = new_obj <= obj
            a = accept.view(shape)
            x = torch.where(a, x_new, x)
            grad = torch.where(a, new_grad, grad)
            obj = torch.where(accept, new_obj, obj)
            lr = torch.where(accept, lr, lr * self.decay)
        return x


COEFFICIENT_SOLVERS = ("projected_gradient", "exact")


def simplex_projected_gradient(
    features: torch.Tensor,
    target: torch.Tensor,
    init: torch.Tensor | None = None,
    steps: int = 10_000,
    tol: float = 1e-6,
) -> torch.Tensor:
    """Zhu et al.'s coefficient update: projected gradient on ``0.5 ||X^T c - t||^2`` over the simplex.

    Batched over an ensemble: ``features`` ``[n, k, d]`` (or ``[k, d]``), ``target`` ``[n, d]`` (or ``[d]``),
    ``init`` ``[n, k]`` warm start (default uniform ``1/k``, the authors' start). Each step is
    ``c <- P_simplex(c - (G c - X t) / L)`` with ``G = X X^T`` and ``L`` its largest eigenvalue; a row stops
    when ``||c_new - c|| / max(||c||, 1e-8) < tol`` (the authors' rule, tolerance 1e-6, at most 10,000 steps).
    The authors start from step ``2 / L_hat`` with a one-sample estimate ``L_hat <= L`` and halve it whenever
    the objective rises; ``1 / L`` is the classic step that never raises it, so no backtracking is needed.
    Both converge to the same minimiser; warm-started from the previous outer step, few iterations are needed.

    Returns:
        coefficients shaped like ``init`` (``[n, k]`` or ``[k]``), rows on the simplex.
    """
    check_finite("features", features)
    check_finite("target", target)
    check_finite("init", init)
    check_positive_int("steps", steps)
    check_non_negative("tol", tol)
    single = features.ndim == 2
    f = features.detach().double().reshape(-1, *features.shape[-2:]).flatten(2)  # [n, k, d]
    t = target.detach().double().reshape(f.shape[0], -1)
    n, k = f.shape[0], f.shape[1]
    if t.shape[1] != f.shape[2]:
        raise ValueError(f"target must have {f.shape[2]} features per extractor, got {t.shape[1]}")
    gram = f @ f.transpose(1, 2)
    lin = (f @ t.unsqueeze(2)).squeeze(2)
    lip = torch.linalg.eigvalsh(gram)[:, -1].clamp(min=1e-12).unsqueeze(1)
    if init is None:
        c = torch.full((n, k), 1.0 / k, dtype=torch.float64, device=f.device)
    else:
        c = project_simplex(init.detach().double().reshape(n, k))
    active = torch.ones(n, dtype=torch.bool, device=f.device)
    for _ in range(steps):
        c_new = project_simplex(c - ((gram @ c.unsqueeze(2)).squeeze(2) - lin) / lip)
        change = (c_new - c).norm(dim=1) / c.norm(dim=1).clamp(min=1e-8)
        c = torch.where(active.unsqueeze(1), c_new, c)
        active = active & (change >= tol)
        if not bool(active.any()):
            break
    out = c.to(features.dtype)
    return out[0] if single else out


class ConvexPolytope(PoisonAttack):
    """Convex-polytope poisons (Zhu et al., "Transferable Clean-Label Poisoning Attacks on Deep Neural
    Nets", ICML 2019, arXiv 1905.05897, Algorithm 1; the authors' code ``zhuchen03/ConvexPolytopePosioning``).

    For an ensemble of substitute feature extractors ``phi_i`` and fixed base images ``b_j``, minimise

    ``sum_i ||phi_i(t) - sum_j c_ij phi_i(x_j)||^2 / (2 ||phi_i(t)||^2)``, ``c_i`` on the simplex,
    ``||x_j - b_j||_inf <= eps``, ``x_j`` in [0, 1],

    alternating, at every outer step, (i) per network, the coefficients ``c_i`` warm-started from the previous
    step (default: the authors' projected-gradient loop, :func:`simplex_projected_gradient`; or ``"exact"``,
    :func:`simplex_least_squares`), and (ii) one Adam step on the poisons (betas ``(momentum, 0.999)``)
    followed by clipping to the eps-box and to [0, 1]. The target's features are computed once (with dropout
    on, one realisation, as the authors do). Dividing by ``||phi_i(t)||^2`` makes the networks' terms
    comparable whatever their feature scale.

    A poison whose coefficient is 0 for every network gets no gradient at that step. With one extractor and
    exact coefficients that can freeze a poison for the whole run; the authors avoid it with an ensemble
    (12 substitutes in their runs) whose dropout stays on while crafting (``dropout=True``): the coefficients
    then differ across networks and across steps, so every poison moves.

    Args:
        steps: outer iterations (the authors' default: 4000).
        lr: Adam step for [0, 1] pixels. The authors' 0.04 acts on CIFAR-normalised inputs (std about 0.2),
            i.e. 0.04 * 0.2 = 0.008 per [0, 1] pixel, the default here.
        eps: L-inf bound of each poison's perturbation in [0, 1] pixels (the authors': 0.1).
        momentum: Adam's first-moment factor (the authors': 0.9).
        coefficient_solver: ``"projected_gradient"`` (the authors' inner loop) or ``"exact"`` (support
            enumeration up to 10 poisons, accelerated projected gradient beyond: the same minimiser).
        coeff_steps: maximum iterations of the coefficient solver per outer step (the authors': 10,000).
        coeff_tol: its relative-change tolerance (the authors': 1e-6).
        dropout: keep every dropout layer of the extractors in train mode while crafting (the authors'
            substitutes keep dropout on); the other layers follow ``model_mode``.
        model_mode: mode of the extractors while crafting (flags restored afterwards).

    Raises:
        ValueError: on non-positive counts or step sizes, a momentum outside [0, 1), an unknown solver.

    Example:
        >>> attack = ConvexPolytope(steps=4000, eps=0.1, dropout=True)
        >>> poisons = attack([LayerFeatures(net, "pool") for net in substitutes], bases, target)
    """

    def __init__(
        self,
        steps: int = 4000,
        lr: float = 0.008,
        eps: float = 0.1,
        momentum: float = 0.9,
        coefficient_solver: str = "projected_gradient",
        coeff_steps: int = 10_000,
        coeff_tol: float = 1e-6,
        dropout: bool = False,
        model_mode: str = "eval",
    ) -> None:
        super().__init__(model_mode)
        self.steps = check_positive_int("steps", steps)
        self.lr = check_positive("lr", lr)
        self.eps = check_positive("eps", eps)
        self.momentum = check_fraction("momentum", momentum)
        self.coefficient_solver = check_choice("coefficient_solver", coefficient_solver, COEFFICIENT_SOLVERS)
        self.coeff_steps = check_positive_int("coeff_steps", coeff_steps)
        self.coeff_tol = check_positive("coeff_tol", coeff_tol)
        if not isinstance(dropout, bool):
            raise ValueError(f"dropout must be a bool, got {dropout!r}")
        self.dropout = dropout

    def _coefficients(self, feats: list[torch.Tensor], targets: list[torch.Tensor],
                      coeffs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.coefficient_solver == "exact":
            return [simplex_least_squares(fe.detach(), tg, c, self.coeff_steps, self.coeff_tol)
                    for fe, tg, c in zip(feats, targets, coeffs)]
        if len({fe.shape[1] for fe in feats}) == 1:  # one batched loop for the whole ensemble
            out = simplex_projected_gradient(torch.stack([fe.detach() for fe in feats]),
                                             torch.cat(targets), torch.stack(coeffs), self.coeff_steps,
                                             self.coeff_tol)
            return list(out.unbind(0))
        return [simplex_projected_gradient(fe.detach(), tg[0], c, self.coeff_steps, self.coeff_tol)
                for fe, tg, c in zip(feats, targets, coeffs)]

    def craft(self, extractors: list[nn.Module], base: torch.Tensor, target: torch.Tensor,
              generator: torch.Generator | None) -> torch.Tensor:
        if self.dropout:
            # The caller's model_mode context recorded every flag and restores them afterwards.
            for e in extractors:
                for m in e.modules():
                    if isinstance(m, nn.modules.dropout._DropoutNd):
                        m.train()
        k = base.shape[0]
        with torch.no_grad():
            targets = [f(target).flatten(1).detach() for f in extractors]
        coeffs = [torch.full((k,), 1.0 / k, dtype=base.dtype, device=base.device) for _ in extractors]
        x = base.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr, betas=(self.momentum, 0.999))
        for _ in range(self.steps):
            feats = [f(x).flatten(1) for f in extractors]
            coeffs = self._coefficients(feats, targets, coeffs)
            loss = convex_polytope_loss(feats, targets, coeffs)
            (grad,) = torch.autograd.grad(loss, x)
            x.grad = grad
            opt.step()
            with torch.no_grad():
                x.copy_((base + (x - base).clamp(-self.eps, self.eps)).clamp(0.0, 1.0))
        return x.detach()
