"""Second-order interpretation: the input Hessian of ReLU networks, its spectrum, and CASO / CAFO.

Singla, Wallace, Feng & Feizi, "Understanding Impacts of High-Order Loss Approximations and Features in Deep
Learning Interpretation" (arXiv 1902.00407).

* For a piecewise-linear network (ReLU, max-pooling, linear layers) with logits ``z = f(x)``, Jacobian
  ``J = ∂z/∂x`` (``C x D``) and softmax ``p``, the cross-entropy loss ``ℓ = -log p_y`` has input gradient
  ``∇ℓ = Jᵀ (p - e_y)`` and input Hessian ``H = Jᵀ (diag(p) - p pᵀ) J`` (the logits' own second derivative
  vanishes almost everywhere). ``H`` has rank at most ``C - 1`` and is computed from the ``C x C`` matrix
  ``Fᵀ F`` with ``F = Jᵀ A^{1/2}``, ``A = diag(p) - p pᵀ``. The paper proves that for confident predictions
  ``H`` is nearly rank one with its top eigenvector nearly parallel to the gradient.
* **CASO** (confident, second-order): the explanation ``Δ`` maximizes the second-order loss model with
  an elastic-net penalty, ``gᵀΔ + ½ ΔᵀHΔ - (λ₂/2)||Δ||² - λ₁||Δ||₁`` (the L1 term, a relaxation of L0, makes
  ``Δ`` select groups of features jointly), solved by accelerated proximal gradient descent (FISTA) with a
  backtracking line search. ``λ₂`` is shifted by the top eigenvalue of ``H`` (as in the authors' code) so
  the problem is strictly concave. **CAFO** drops the Hessian: ``Δ = soft_threshold(g, λ₁) / λ₂``.

Other networks get exact Hessian-vector products by double backpropagation (:func:`hessian_vector_product`)
and their top eigenpair by power iteration (:func:`top_hessian_eigen`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.utils.validation import (
    check_choice,
    check_finite,
    check_non_negative,
    check_positive,
    check_positive_int,
)

__all__ = [
    "HessianEigen",
    "caso_solve",
    "group_features",
    "hessian_eigen_analysis",
    "hessian_factor",
    "hessian_vector_product",
    "input_jacobian",
    "relu_input_hessian",
    "top_hessian_eigen",
]

MatVec = Callable[[torch.Tensor], torch.Tensor]


def _check_x(x: torch.Tensor) -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch [B, ...], got shape {tuple(x.shape)}")


def _labels(y: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    if y is None:
        return logits.argmax(1)
    if not torch.is_tensor(y) or y.is_floating_point() or y.shape != logits.shape[:1]:
        raise ValueError(f"y must be None or an integer tensor of shape [{logits.shape[0]}], got "
                         + (f"shape {tuple(y.shape)} ({y.dtype})" if torch.is_tensor(y) else repr(y)))
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"y must hold class indices in [0, {logits.shape[1] - 1}]")
    return y.to(device=logits.device, dtype=torch.long)


def input_jacobian(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and their Jacobian with respect to the flattened input.

    Each input is replicated once per class and the diagonal of the replicated logits is differentiated,
    so one backward pass yields all ``C`` rows (the authors' trick); at most ``batch_size`` replicas run
    at once. The model runs in its current mode (use eval mode for nets with batch norm).

    Returns:
        ``(logits [B, C], J [B, C, D])`` with ``D`` the number of input features.
    """
    check_finite("x", x)
    _check_x(x)
    check_positive_int("batch_size", batch_size)
    with torch.inference_mode(False), torch.enable_grad():
        x0 = x.detach().clone()
        with torch.no_grad():
            logits = model(x0)
        B, C = logits.shape
        per = max(1, batch_size // C)
        rows = []
        for s in range(0, B, per):
            xs = x0[s:s + per].repeat_interleave(C, 0).requires_grad_(True)
            z = model(xs).view(-1, C, C)
            (g,) = torch.autograd.grad(z.diagonal(dim1=1, dim2=2).sum(), xs)
            rows.append(g.reshape(-1, C, g[0].numel()))
    return logits.detach(), torch.cat(rows)


def _softmax_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, diag(p) - p pᵀ)`` in float64, accurate for confident predictions.

    ``p = exp(log_softmax(z))`` keeps tiny probabilities exact, and ``1 - p_i`` is summed from the other
    probabilities: computing it as a difference would cancel to 0 when ``p_i`` rounds to 1, which flattens
    the curvature (and the gradient) of exactly the confident inputs the paper's theorem is about.
    """
    p = logits.double().log_softmax(1).exp()
    big = p >= 0.5                              # at most one entry per row
    one_minus = torch.where(big, p.masked_fill(big, 0.0).sum(1, keepdim=True), 1.0 - p)
    A = -p[:, :, None] * p[:, None, :]
    A.diagonal(dim1=1, dim2=2).copy_(p * one_minus)
    return p, A


def _loss_residual(p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``p - e_y`` with ``p_y - 1 = -Σ_{j≠y} p_j`` (no cancellation when ``p_y`` is close to 1)."""
    others = p.scatter(1, labels[:, None], 0.0).sum(1, keepdim=True)
    return p.scatter(1, labels[:, None], -others)


def _sqrt_psd(A: torch.Tensor) -> torch.Tensor:
    w, U = torch.linalg.eigh(A)
    return U * w.clamp_min(0).sqrt()[:, None, :] @ U.transpose(1, 2)


def relu_input_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                       batch_size: int = 1024) -> torch.Tensor:
    """Closed-form Hessian of the cross-entropy loss w.r.t. the flattened input of a ReLU network.

    ``H = Jᵀ (diag(p) - p pᵀ) J`` (Singla et al., arXiv 1902.00407, Theorem 1), exact wherever the network is
    piecewise linear (ReLU, leaky ReLU, max/avg-pooling, linear and convolutional layers, normalization in
    eval mode); for smooth activations it is the Gauss-Newton part of the Hessian. It does not depend on
    the label: ``y`` is accepted for symmetry with the loss and validated.

    Args:
        model: maps ``x`` to logits ``[B, C]``.
        x: inputs ``[B, ...]`` (use float64 for reference-grade accuracy).
        y: optional labels ``[B]`` (checked only).
        batch_size: most replicated inputs per forward pass (see :func:`input_jacobian`).

    Returns:
        ``[B, D, D]`` symmetric positive semi-definite matrices.

    Example:
        >>> H = relu_input_hessian(net.double(), x.double(), y)   # [B, 64, 64] for 8x8 digits
    """
    check_finite("x", x)
    logits, J = input_jacobian(model, x, batch_size)
    _labels(y, logits)
    Jd = J.double()
    return (Jd.transpose(1, 2) @ _softmax_stats(logits)[1] @ Jd).to(J.dtype)


def hessian_factor(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank factor of the ReLU input Hessian: ``H = F Fᵀ`` with ``F = Jᵀ A^{1/2}`` (``[B, D, C]``).

    Returns:
        ``(logits [B, C], F [B, D, C])``.
    """
    check_finite("x", x)
    logits, J = input_jacobian(model, x, batch_size)
    return logits, (J.double().transpose(1, 2) @ _sqrt_psd(_softmax_stats(logits)[1])).to(J.dtype)


@dataclass
class HessianEigen:
    """Spectrum of the ReLU input Hessian and its relation to the loss gradient (per sample).

    All fields are float64: the softmax curvature of confident predictions is lost to rounding in float32.

    Attributes:
        eigenvalues: ``[B, C]`` non-zero part of the spectrum, descending (the rest of the ``D`` eigenvalues
            are 0).
        top_eigenvector: ``[B, D]`` unit eigenvector of the largest eigenvalue, signed to agree with the gradient.
        gradient: ``[B, D]`` gradient of the cross-entropy loss w.r.t. the flattened input.
        cosine: ``[B]`` ``|cos(top eigenvector, gradient)|``.
        top_share: ``[B]`` ``λ₁ / Σλ`` (share of the trace held by the top eigenvalue; 1 = rank one).
        confidence: ``[B]`` softmax probability of the predicted class.
        runner_up_share: ``[B]`` ``p_(2) / (1 - p_(1))``, the second most likely class's share of the
            probability left by the predicted one. As ``p_(1) -> 1``, ``H ≈ Σ_{j≠y} p_j (J_j - J_y)(J_j - J_y)ᵀ``,
            which is rank one with the gradient as top eigenvector when this share is near 1.
        labels: ``[B]`` classes whose loss was analysed.
    """

    eigenvalues: torch.Tensor
    top_eigenvector: torch.Tensor
    gradient: torch.Tensor
    cosine: torch.Tensor
    top_share: torch.Tensor
    confidence: torch.Tensor
    runner_up_share: torch.Tensor
    labels: torch.Tensor


def hessian_eigen_analysis(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None,
                           batch_size: int = 1024) -> HessianEigen:
    """The paper's eigen-analysis of the ReLU input Hessian of the cross-entropy loss.

    Computes the ``C`` non-trivial eigenvalues from ``Fᵀ F`` (``C x C``, :func:`hessian_factor`), the top
    eigenvector ``F u₁ / sqrt(λ₁)``, the loss gradient ``Jᵀ (p - e_y)``, the cosine between them and the top
    eigenvalue's share of the trace. Singla et al. (arXiv 1902.00407, Theorem 2): for confident predictions
    the Hessian is nearly rank one (share near 1) and its top eigenvector nearly parallel to the gradient.

    Args:
        model: a piecewise-linear classifier.
        x: inputs ``[B, ...]``.
        y: labels of the loss; ``None`` uses the predicted class (the interpretation setting).

    Example:
        >>> info = hessian_eigen_analysis(net, x)
        >>> info.cosine, info.confidence
    """
    check_finite("x", x)
    logits, J = input_jacobian(model, x, batch_size)
    labels = _labels(y, logits)
    p, A = _softmax_stats(logits)
    Jd = J.double()
    Fm = Jd.transpose(1, 2) @ _sqrt_psd(A)
    w, U = torch.linalg.eigh(Fm.transpose(1, 2) @ Fm)      # ascending
    w, U = w.flip(1).clamp_min(0), U.flip(2)
    v = (Fm @ U[:, :, 0:1]).squeeze(2)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    grad = (Jd.transpose(1, 2) @ _loss_residual(p, labels)[:, :, None]).squeeze(2)
    dot = (v * grad).sum(1)
    v = torch.where(dot[:, None] < 0, -v, v)
    cosine = dot.abs() / grad.norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
    share = w[:, 0] / w.sum(1).clamp_min(torch.finfo(w.dtype).tiny)
    top2 = p.topk(2, dim=1)
    rest = p.scatter(1, top2.indices[:, :1], 0.0).sum(1)  # 1 - p_(1) summed from the small terms
    runner_up = top2.values[:, 1] / rest.clamp_min(torch.finfo(rest.dtype).tiny)
    return HessianEigen(eigenvalues=w, top_eigenvector=v, gradient=grad, cosine=cosine, top_share=share,
                        confidence=top2.values[:, 0], runner_up_share=runner_up, labels=labels)


def _loss_and_input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(leaf input, labels, ∂ℓ/∂x with its graph) for the summed per-sample cross-entropy."""
    x0 = x.detach().clone().requires_grad_(True)
    logits = model(x0)
    labels = _labels(y, logits.detach())
    (g,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), x0, create_graph=True)
    return x0, labels, g


def hessian_vector_product(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """Exact ``H v`` for the per-sample cross-entropy Hessian w.r.t. the input, by double backpropagation.

    Works for any twice-differentiable network (e.g. softplus); for ReLU networks it agrees with
    :func:`relu_input_hessian` almost everywhere.

    Args:
        model, x: the classifier and inputs ``[B, ...]``.
        y: labels ``[B]``, or ``None`` for the predicted classes.
        v: vectors shaped like ``x`` (or ``[B, D]``).

    Returns:
        ``H v`` shaped like ``v``.
    """
    check_finite("x", x)
    check_finite("v", v)
    _check_x(x)
    with torch.inference_mode(False), torch.enable_grad():
        x0, _, g = _loss_and_input_grad(model, x, y)
        (hv,) = torch.autograd.grad(g, x0, grad_outputs=v.detach().reshape(x0.shape))
    return hv.reshape(v.shape)


def top_hessian_eigen(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, n_iter: int = 20,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest-magnitude eigenpair of the input Hessian by power iteration on exact Hessian-vector products.

    For networks without a closed form (the authors use 10 iterations). Returns ``(eigenvalue [B],
    unit eigenvector [B, D])``.
    """
    check_finite("x", x)
    _check_x(x)
    check_positive_int("n_iter", n_iter)
    with torch.inference_mode(False), torch.enable_grad():
        x0, _, g = _loss_and_input_grad(model, x, y)
        v = torch.rand(x0.shape, generator=generator, device=generator.device if generator else x0.device,
                       dtype=x0.dtype).to(x0.device) - 0.5
        v = v.flatten(1)
        v = v / v.norm(dim=1, keepdim=True)
        lam = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        for _ in range(n_iter):
            (hv,) = torch.autograd.grad(g, x0, grad_outputs=v.view_as(x0), retain_graph=True)
            hv = hv.flatten(1)
            lam = (v * hv).sum(1)
            v = hv / hv.norm(dim=1, keepdim=True).clamp_min(torch.finfo(hv.dtype).tiny)
    return lam.detach(), v.detach()


def _soft_threshold(v: torch.Tensor, thresh: torch.Tensor | float) -> torch.Tensor:
    return v.sign() * (v.abs() - thresh).clamp_min(0)


def caso_solve(grad: torch.Tensor, hvp: MatVec | None, lambda1: float, lambda2: torch.Tensor | float,
               n_iter: int = 10, lr: torch.Tensor | float = 0.05, init: torch.Tensor | None = None,
               max_backtracks: int = 40) -> torch.Tensor:
    """Maximize ``gᵀΔ + ½ ΔᵀHΔ - (λ₂/2)||Δ||² - λ₁||Δ||₁`` per row by accelerated proximal gradient.

    FISTA on the equivalent minimization of ``-gᵀΔ - ½ΔᵀHΔ + (λ₂/2)||Δ||²`` (smooth part) plus ``λ₁||Δ||₁``
    (soft-thresholding prox), momentum ``(k - 2)/(k + 1)``, and a backtracking line search per row that
    starts each iteration at step ``lr`` and halves it until the quadratic upper bound holds (as in the
    authors' code, but with a step size per sample instead of one shared by the batch).

    Args:
        grad: ``[B, D]`` gradients ``g``.
        hvp: ``[B, D] -> [B, D]`` Hessian-vector product, or ``None`` for ``H = 0`` (CAFO).
        lambda1: L1 weight (>= 0).
        lambda2: L2 weight, a number or a ``[B]`` tensor (must exceed ``H``'s top eigenvalue for concavity).
        n_iter: proximal iterations (the paper uses 10).
        lr: initial step size of each line search, a number or a ``[B]`` tensor.
        init: starting point (default zeros, as in the paper).

    Returns:
        ``[B, D]`` the (approximate) maximizer ``Δ``.
    """
    check_finite("grad", grad)
    check_finite("lambda2", lambda2)
    check_finite("init", init)
    check_non_negative("lambda1", lambda1)
    check_positive_int("n_iter", n_iter)
    if isinstance(lr, torch.Tensor):
        if not bool((lr > 0).all()) or not bool(torch.isfinite(lr).all()):
            raise ValueError("lr must hold positive finite numbers")
    else:
        check_positive("lr", lr)
    g = grad.detach().flatten(1)
    l2 = torch.as_tensor(lambda2, dtype=g.dtype, device=g.device).expand(g.shape[0])[:, None]
    lr0 = torch.as_tensor(lr, dtype=g.dtype, device=g.device).expand(g.shape[0])[:, None]

    def smooth(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hd = hvp(d) if hvp is not None else torch.zeros_like(d)
        value = -(g * d).sum(1) - 0.5 * (d * hd).sum(1) + 0.5 * (l2[:, 0]) * (d * d).sum(1)
        return value, -g - hd + l2 * d

    b = torch.zeros_like(g) if init is None else init.detach().flatten(1).clone()
    b_prev = b
    for k in range(1, n_iter + 1):
        v = b + (k - 2) / (k + 1) * (b - b_prev)
        f_v, grad_v = smooth(v)
        b_prev = b
        t = lr0.clone()
        new = _soft_threshold(v - t * grad_v, t * lambda1)
        pending = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
        for _ in range(max_backtracks):
            f_new, _ = smooth(new)
            diff = new - v
            bound = f_v + (grad_v * diff).sum(1) + (diff * diff).sum(1) / (2 * t[:, 0])
            pending = pending & (f_new > bound + 1e-12 * bound.abs())
            if not bool(pending.any()):
                break
            t = torch.where(pending[:, None], t / 2, t)
            new = torch.where(pending[:, None], _soft_threshold(v - t * grad_v, t * lambda1), new)
        b = new
    return b


def group_features(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, lambda1: float = 1e-4,
                   lambda2: float = 4.0, second_order: bool = True, n_iter: int = 10, lr: float = 0.05,
                   hessian: str = "relu", shift: bool = True, lambda2_relative: bool = False,
                   closed_form: bool = True, smooth_samples: int = 0, sigma: float = 0.15,
                   sigma_relative: bool = True, generator: torch.Generator | None = None,
                   batch_size: int = 1024) -> torch.Tensor:
    """CASO (``second_order=True``) or CAFO (``False``) group-feature explanations (arXiv 1902.00407).

    ``Δ* = argmax_Δ gᵀΔ + ½ ΔᵀHΔ - (λ₂/2)||Δ||² - λ₁||Δ||₁`` for the cross-entropy loss of class ``y`` at ``x``
    (the predicted class by default), solved by :func:`caso_solve`. The L2 weight is set against the
    Hessian's top eigenvalue ``λ_max(H)``: with ``shift`` (the authors' code, the default) it becomes
    ``λ₂ + λ_max(H)`` so the objective is strictly concave; with ``lambda2_relative`` the given ``λ₂`` is
    in units of ``λ_max(H)`` (weight ``λ₂ · λ_max``, plus ``λ_max`` with ``shift``), so the Hessian term keeps
    the same weight relative to the L2 term whatever the scale of ``H``. That scale shrinks like ``1 - p_max``
    for confident predictions: with a fixed ``λ₂`` CASO tends to CAFO there for that reason alone, while
    with a relative ``λ₂`` and ``λ₁ = 0`` CASO is parallel to CAFO exactly when the gradient is an eigenvector
    of ``H`` (as when ``H`` is rank one along it, the paper's Theorem 2), so ``cos(CASO, CAFO)`` tests that.

    CAFO (``H = 0``) has the closed form ``soft_threshold(g, λ₁) / λ₂`` (its L2 weight: ``λ₂``, or
    ``λ₂ · λ_max(H)`` with ``lambda2_relative``); with ``closed_form=False`` it runs the same ``n_iter``
    proximal iterations as CASO instead (as the authors' code does), for comparisons at an equal iteration
    budget. With ``smooth_samples > 0`` the gradient and Hessian are averaged over that many Gaussian
    perturbations of ``x`` (the paper's smoothed CASO; the authors' command line smooths with 16), of
    standard deviation ``sigma`` times each input's range ``max(x) - min(x)`` (the authors' ``stddev_spread``)
    or, with ``sigma_relative=False``, ``sigma`` itself. Defaults follow the authors' code
    (singlasahil14/CASO): ``λ₁ = 1e-4``, ``λ₂ = 4`` shifted by ``λ_max``, 10 iterations from step 0.05,
    ``σ = 0.15 ×`` range.

    Args:
        model: the classifier.
        x: inputs ``[B, ...]``.
        y: classes to explain (``None``: predictions at ``x``).
        lambda1: L1 (group sparsity) weight, >= 0; larger values give sparser explanations.
        lambda2: L2 weight, > 0 (a multiple of ``λ_max(H)`` with ``lambda2_relative``).
        second_order: include the Hessian term (CASO) or not (CAFO).
        n_iter, lr: proximal-gradient iterations and initial line-search step (paper: 10 and 0.05; with
            ``lambda2_relative`` the step is in units of ``1 / λ_max(H)``).
        hessian: ``"relu"`` (closed form ``Jᵀ A J``: exact for piecewise-linear nets, fast) or ``"autograd"``
            (exact Hessian-vector products by double backpropagation, for smooth nets; top eigenvalue by
            power iteration).
        shift: add the top Hessian eigenvalue to the L2 weight (CASO only).
        lambda2_relative: read ``lambda2`` in units of the top Hessian eigenvalue (CASO and CAFO alike).
        closed_form: CAFO only: the exact soft-thresholding solution (True) or ``n_iter`` proximal iterations.
        smooth_samples: Gaussian perturbations to average over (0: none).
        sigma: their standard deviation, relative to each input's range (or absolute, see ``sigma_relative``).
        sigma_relative: multiply ``sigma`` by ``max(x) - min(x)`` per input (the authors' convention).
        generator: random source for the perturbations and the power iteration.

    Returns:
        ``Δ`` shaped like ``x``.

    Raises:
        ValueError: on negative ``lambda1``, non-positive ``lambda2``/``lr``/``sigma``, ``n_iter < 1``, an
            unknown ``hessian``, or ``lambda2 <= 1`` with ``lambda2_relative`` and no ``shift`` (not concave).

    Example:
        >>> caso = group_features(net, x, lambda1=1e-3, lambda2=4.0)
        >>> cafo = group_features(net, x, lambda1=1e-3, lambda2=4.0, second_order=False)
    """
    check_finite("x", x)
    _check_x(x)
    check_non_negative("lambda1", lambda1)
    check_positive("lambda2", lambda2)
    check_positive_int("n_iter", n_iter)
    check_positive("lr", lr)
    check_choice("hessian", hessian, ("relu", "autograd"))
    check_positive("sigma", sigma)
    if lambda2_relative and second_order and not shift and lambda2 <= 1:
        raise ValueError(f"lambda2 must exceed 1 when lambda2_relative=True and shift=False (the L2 weight "
                         f"lambda2 * lambda_max(H) must exceed H's top eigenvalue), got {lambda2!r}")
    if not isinstance(smooth_samples, int) or isinstance(smooth_samples, bool) or smooth_samples < 0:
        raise ValueError(f"smooth_samples must be a non-negative integer, got {smooth_samples!r}")
    B = x.shape[0]
    with torch.inference_mode(False), torch.enable_grad():
        x0 = x.detach().clone()
        if y is None:
            with torch.no_grad():
                y = model(x0).argmax(1)
        n = max(1, smooth_samples)
        if smooth_samples:
            dev = generator.device if generator is not None else x0.device
            noise = torch.randn((n, *x0.shape), generator=generator, device=dev, dtype=x0.dtype).to(x0.device)
            flat = x0.flatten(1)
            std = sigma * (flat.amax(1) - flat.amin(1)) if sigma_relative else torch.full_like(flat[:, 0], sigma)
            xs = (x0[None] + std.view(1, B, *([1] * (x0.ndim - 1))) * noise).reshape(n * B, *x0.shape[1:])
        else:
            xs = x0
        ys = y.repeat(n)
        if hessian == "relu" or (not second_order and not lambda2_relative):
            logits, J = input_jacobian(model, xs, batch_size)
            labels = _labels(ys, logits)
            # Float64 from here on: confident inputs have gradients and curvatures near float32's range.
            p, A = _softmax_stats(logits)
            Jd = J.double()
            grad = (Jd.transpose(1, 2) @ _loss_residual(p, labels)[:, :, None]).squeeze(2).view(n, B, -1).mean(0)
            if not second_order and not lambda2_relative and closed_form:
                return (_soft_threshold(grad, lambda1) / lambda2).to(x.dtype).view_as(x)
            fac = Jd.transpose(1, 2) @ _sqrt_psd(A)
            # Stack the samples' factors: H̄ = (1/n) Σ_s F_s F_sᵀ = F̄ F̄ᵀ with F̄ = [F_1 .. F_n] / sqrt(n).
            fac = fac.view(n, B, fac.shape[1], fac.shape[2]).permute(1, 2, 0, 3).reshape(B, fac.shape[1], -1)
            fac = fac / n ** 0.5

            def hvp(d: torch.Tensor) -> torch.Tensor:
                return (fac @ (fac.transpose(1, 2) @ d[:, :, None])).squeeze(2)

            top = torch.linalg.eigvalsh(fac.transpose(1, 2) @ fac)[:, -1].clamp_min(0)
        else:
            xl, _, g_all = _loss_and_input_grad(model, xs, ys)
            grad = g_all.detach().flatten(1).view(n, B, -1).mean(0)

            def hvp(d: torch.Tensor) -> torch.Tensor:
                rep = d.repeat(n, 1).view_as(xl)
                (hv,) = torch.autograd.grad(g_all, xl, grad_outputs=rep, retain_graph=True)
                return hv.flatten(1).view(n, B, -1).mean(0)

            v = torch.rand(grad.shape, generator=generator, device=generator.device if generator else grad.device,
                           dtype=grad.dtype).to(grad.device) - 0.5
            v = v / v.norm(dim=1, keepdim=True)
            top = torch.zeros(B, dtype=grad.dtype, device=grad.device)
            for _ in range(20):
                hv = hvp(v)
                top = (v * hv).sum(1)
                v = hv / hv.norm(dim=1, keepdim=True).clamp_min(torch.finfo(hv.dtype).tiny)
            top = top.clamp_min(0)
        l2 = lambda2 * top if lambda2_relative else torch.full_like(top, float(lambda2))
        if second_order and shift:
            l2 = l2 + top
        # A top eigenvalue that underflowed to 0 (p_max = 1 in float64) has a zero gradient too: keep l2 > 0.
        l2 = l2.clamp_min(torch.finfo(l2.dtype).tiny)
        # Relative units make the iterations scale-free too: the first step is lr / λ_max, so that H scaled
        # by c (and λ₂ with it) gives the same iterates scaled by 1/c when λ₁ = 0.
        step: torch.Tensor | float = lr / top.clamp_min(torch.finfo(top.dtype).tiny) if lambda2_relative else lr
        if not second_order:
            if closed_form:
                return (_soft_threshold(grad, lambda1) / l2[:, None]).to(x.dtype).view_as(x)
            delta = caso_solve(grad, None, lambda1, l2, n_iter=n_iter, lr=step)
        else:
            delta = caso_solve(grad, hvp, lambda1, l2, n_iter=n_iter, lr=step)
    return delta.detach().to(x.dtype).view_as(x)
