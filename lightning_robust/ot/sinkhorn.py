"""Entropic optimal transport in the log domain: batched Sinkhorn with implicit gradients, Sinkhorn divergence.

For a cost ``C`` ([..., n, m]), marginals ``a`` ([n]) and ``b`` ([m]) and ``ε > 0`` (``reg``), entropic OT is

    OT_ε(a, b) = min_{P 1 = a, Pᵀ 1 = b}  <P, C> + ε KL(P | a bᵀ),

whose solution is ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / ε)`` for the dual potentials ``(f, g)``, the fixed
point of the soft c-transforms (Sinkhorn's iterations in the log domain, stable at any ``ε``):

    g_j = -ε log Σ_i a_i exp((f_i - C_ij) / ε),        f_i = -ε log Σ_j b_j exp((g_j - C_ij) / ε).

The default iterations keep the potentials in the log domain but run the half-steps as matrix-vector
products on a stabilized kernel ``exp((f ⊕ g - C) / ε)`` that is re-absorbed into the potentials whenever a
scaling leaves ``[e^-10, e^10]``, falling back to ``logsumexp`` steps where the kernel underflows (Schmitzer
2016, arXiv 1610.06519); ``method="log"`` runs every half-step as a ``logsumexp``. Both end with one exact
log-domain iteration and reach the same fixed point.

At the fixed point ``OT_ε = <a, f> + <b, g>``. Potentials are defined up to ``(f + t, g - t)``; we return the
normalized pair with ``<a, f> = <b, g>`` so that they are functions of ``(C, a, b)`` alone (independent of the
starting point), and symmetric problems give ``f = g``.

Gradients with respect to the cost flow through the *converged* potentials by the implicit function theorem
(:class:`_ImplicitPotentials`): the backward pass solves one linear system with the Jacobian of the
fixed-point equations instead of back-propagating through every iteration, so memory does not grow with
the number of iterations. Everything downstream (plan, value, objective) is ordinary autograd on ``(f, g, C)``;
the gradient of the objective is the plan (the envelope theorem), which the tests check.

References: Cuturi (2013) arXiv 1306.0895; Peyré & Cuturi, *Computational Optimal Transport* (2019) §4.4;
Feydy et al. (2019) arXiv 1810.08278 (debiased Sinkhorn divergence); Luise et al. (2018) arXiv 1805.11897
(implicit differentiation of Sinkhorn).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from lightning_robust.ot.costs import CostFn, resolve_cost
from lightning_robust.utils.validation import check_choice, check_positive, check_positive_int

__all__ = ["SinkhornConvergenceWarning", "SinkhornResult", "sinkhorn", "sinkhorn_divergence"]


class SinkhornConvergenceWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` before the marginal error fell below ``tol``."""


@dataclass(eq=False)
class SinkhornResult:
    """The output of :func:`sinkhorn`.

    Attributes:
        f, g: dual potentials ([..., n] and [..., m]), normalized so that ``<a, f> = <b, g>``.
        cost: the cost matrix the problem was solved for.
        log_a, log_b: log marginals (``-inf`` where a weight is zero).
        reg: ``ε``.
        iterations: Sinkhorn iterations run (one iteration updates ``g`` then ``f``).
        error: ``[...]`` L1 violation of the column marginal, ``Σ_j |(Pᵀ 1)_j - b_j|``, of the returned plan
            (its row marginal is exact up to rounding, as the last half-step updates ``f``).
        converged: whether every problem of the batch met the stopping test (row violation ``< tol`` before
            the last ``f``-update, so ``error`` is typically smaller still).
    """

    f: torch.Tensor
    g: torch.Tensor
    cost: torch.Tensor
    log_a: torch.Tensor
    log_b: torch.Tensor
    reg: float
    iterations: int
    error: torch.Tensor
    converged: bool

    @cached_property
    def plan(self) -> torch.Tensor:
        """``P_ij = a_i b_j exp((f_i + g_j - C_ij) / ε)``, shape [..., n, m]."""
        logp = self.log_a[..., :, None] + self.log_b[..., None, :] + (
            self.f[..., :, None] + self.g[..., None, :] - self.cost) / self.reg
        return logp.exp()

    @cached_property
    def value(self) -> torch.Tensor:
        """The transport cost of the entropic plan, ``<P, C>`` ([...])."""
        return (self.plan * self.cost).sum((-2, -1))

    @property
    def objective(self) -> torch.Tensor:
        """The entropic OT cost ``OT_ε = <P, C> + ε KL(P | a bᵀ) = <a, f> + <b, g>`` ([...])."""
        return (self.log_a.exp() * self.f).sum(-1) + (self.log_b.exp() * self.g).sum(-1)


def _marginal(name: str, w: torch.Tensor | None, size: int, batch: torch.Size, like: torch.Tensor) -> torch.Tensor:
    """Validate a marginal and return it broadcast to ``batch + (size,)`` in the cost's dtype and device."""
    if w is None:
        return torch.full((*batch, size), 1.0 / size, dtype=like.dtype, device=like.device)
    if not torch.is_tensor(w):
        w = torch.as_tensor(w)
    w = w.to(dtype=like.dtype, device=like.device)
    if w.ndim == 0 or w.shape[-1] != size:
        raise ValueError(f"{name} must have {size} entries along its last dimension (matching the cost), "
                         f"got shape {tuple(w.shape)}")
    try:
        w = w.expand(*batch, size)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(w.shape)} does not broadcast to the cost's batch shape "
                         f"{tuple(batch)}") from None
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} must be finite, got NaN or inf")
    if (w < 0).any():
        raise ValueError(f"{name} must be non-negative, got minimum {float(w.min()):.6g}")
    sums = w.sum(-1)
    atol = 1e-6 if w.dtype == torch.float64 else 1e-4
    if ((sums - 1).abs() > atol).any():
        raise ValueError(f"{name} must sum to one (a probability vector), got sums in "
                         f"[{float(sums.min()):.6g}, {float(sums.max()):.6g}]")
    return w


class _ImplicitPotentials(torch.autograd.Function):
    """Identity on converged potentials ``(f, g)`` whose backward is the implicit derivative w.r.t. the cost.

    With ``R = softmax_j(log b_j + (g_j - C_ij)/ε)`` (rows) and ``Q = softmax_i(log a_i + (f_i - C_ij)/ε)``
    (columns), the fixed-point equations ``F(f, g, C) = 0`` have Jacobian ``J = [[I, R], [Qᵀ, I]]``, singular
    along the gauge ``(1, -1)``. The vector-Jacobian product of the normalized potentials is
    ``C̄ = R ⊙ μ₁ 1ᵀ + Q ⊙ 1 μ₂ᵀ`` with ``Jᵀ μ = Πᵀ (f̄, ḡ)``, ``Π`` the projection onto the gauge
    ``<a, f> = <b, g>``. The ``min(n, m)``-sized Schur complement of ``Jᵀ`` is solved densely.
    """

    @staticmethod
    def forward(ctx: Any, cost: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, f: torch.Tensor,
                g: torch.Tensor, reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cost, log_a, log_b, f, g)
        ctx.reg = reg
        return f.clone(), g.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_f: torch.Tensor | None, grad_g: torch.Tensor | None) -> tuple[Any, ...]:
        cost, log_a, log_b, f, g = ctx.saved_tensors
        eps = ctx.reg
        if grad_f is None:
            grad_f = torch.zeros_like(f)
        if grad_g is None:
            grad_g = torch.zeros_like(g)
        n, m = cost.shape[-2], cost.shape[-1]
        R = torch.softmax(log_b[..., None, :] + (g[..., None, :] - cost) / eps, dim=-1)
        Q = torch.softmax(log_a[..., :, None] + (f[..., :, None] - cost) / eps, dim=-2)
        a, b = log_a.exp(), log_b.exp()
        t = (grad_f.sum(-1) - grad_g.sum(-1)) / (a.sum(-1) + b.sum(-1))
        s1 = grad_f - a * t[..., None]
        s2 = grad_g + b * t[..., None]
        # J^T mu = s:  mu1 + Q mu2 = s1,  R^T mu1 + mu2 = s2. Eliminate the larger block; the Schur matrix is
        # singular along the gauge, so a rank-one term picks one of the (gradient-equivalent) solutions.
        if m <= n:
            M = torch.eye(m, dtype=cost.dtype, device=cost.device) - R.transpose(-1, -2) @ Q + 1.0 / m
            rhs = s2 - (R.transpose(-1, -2) @ s1[..., None])[..., 0]
            mu2 = torch.linalg.solve(M, rhs[..., None])[..., 0]
            mu1 = s1 - (Q @ mu2[..., None])[..., 0]
        else:
            M = torch.eye(n, dtype=cost.dtype, device=cost.device) - Q @ R.transpose(-1, -2) + 1.0 / n
            rhs = s1 - (Q @ s2[..., None])[..., 0]
            mu1 = torch.linalg.solve(M, rhs[..., None])[..., 0]
            mu2 = s2 - (R.transpose(-1, -2) @ mu1[..., None])[..., 0]
        grad_cost = R * mu1[..., :, None] + Q * mu2[..., None, :]
        return grad_cost, None, None, None, None, None


def _col_softmin(K: torch.Tensor, log_a_alpha: torch.Tensor) -> torch.Tensor:
    """``beta_j = -LSE_i(log a_i + alpha_i + K_ij)``: the exact column update (column marginal met)."""
    return -torch.logsumexp(K + log_a_alpha[..., :, None], dim=-2)


def _row_softmin(K: torch.Tensor, log_b_beta: torch.Tensor) -> torch.Tensor:
    """``alpha_i = -LSE_j(log b_j + beta_j + K_ij)``: the exact row update (row marginal met)."""
    return -torch.logsumexp(K + log_b_beta[..., None, :], dim=-1)


@torch.no_grad()
def _iterate_log(K: torch.Tensor, a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, alpha: torch.Tensor,
                 max_iter: int, tol: float, check_every: int) -> tuple[torch.Tensor, int, bool]:
    """Plain log-domain Sinkhorn on scaled potentials ``alpha = f / ε``, ``beta = g / ε`` (``K = -C / ε``).

    After the column pass the column marginal is exact, and the next row pass reveals the row marginal for
    free, ``(P 1)_i = a_i exp(alpha_i - alpha_new_i)``: the convergence test is O(n), not O(nm).
    """
    log_a_alpha = log_a + alpha
    it = 0
    for it in range(1, max_iter + 1):
        beta = _col_softmin(K, log_a_alpha)
        log_a_alpha_new = log_a + _row_softmin(K, log_b + beta)
        done = False
        if it % check_every == 0:
            err = torch.linalg.vector_norm(a * torch.expm1(log_a_alpha - log_a_alpha_new).nan_to_num(0.0), ord=1,
                                           dim=-1)
            done = bool((err < tol).all())
        log_a_alpha = log_a_alpha_new
        if done:
            return log_a_alpha - log_a, it, True
    return log_a_alpha - log_a, it, False


#: Absorb the scalings into the kernel once one exceeds ``exp(±_ABSORB)``: entries that underflowed in the
#: kernel then stay below ``1e-300 * exp(2 * _ABSORB)`` of the plan in float64 (``1e-38 * ...`` in float32).
_ABSORB = 10.0


@torch.no_grad()
def _iterate_absorb(K: torch.Tensor, a: torch.Tensor, b: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                    alpha: torch.Tensor, max_iter: int, tol: float, check_every: int) -> tuple[torch.Tensor, int, bool]:
    """Log-domain Sinkhorn with an absorbed kernel (Schmitzer 2016, arXiv 1610.06519, "log-stabilized").

    The potentials live in the log domain as ``s = log a + alpha`` and ``t = log b + beta``; between
    absorptions the iterations are the scaling updates ``U = a / (P̃ V)``, ``V = b / (P̃ᵀ U)`` on the
    stabilized kernel ``P̃ = exp(K + s ⊕ t)`` (the plan at the last absorption), i.e. two matrix-vector
    products instead of two ``logsumexp`` passes. When a scaling leaves ``[e^-10, e^10]``, it is absorbed
    (``s += log U``, ``t += log V``, ``P̃`` recomputed in the log domain). Should a column of ``P̃`` lose all
    its mass to underflow (tiny ``ε`` far from the solution), that step is redone in the log domain, so the
    method is as stable as :func:`_iterate_log` and converges to the same fixed point.
    """
    pos_a, pos_b = a > 0, b > 0
    s = log_a + alpha
    t = log_b + _col_softmin(K, s)

    def kernel(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(K + s[..., :, None] + t[..., None, :])

    Kt = kernel(s, t)
    U = torch.ones_like(a)
    V = torch.ones_like(b)
    it = 0
    for it in range(1, max_iter + 1):
        KtV = (Kt @ V[..., None])[..., 0]
        done = False
        if it % check_every == 0:
            err = (U * KtV - a).abs().sum(-1)  # row violation; the columns are exact here
            done = bool((err < tol).all())
        if done:
            return s + U.log() - log_a, it, True
        U = torch.where(pos_a, a / KtV, 0.0)
        KtU = (U[..., None, :] @ Kt)[..., 0, :]
        lost = bool((pos_b & ~(KtU > 0)).any()) or not bool(torch.isfinite(U).all())
        if lost:  # fall back to one log-domain step from the last good state, then re-absorb
            s = log_a + _row_softmin(K, t + V.log())
            t = log_b + _col_softmin(K, s)
            Kt = kernel(s, t)
            U, V = torch.ones_like(a), torch.ones_like(b)
            continue
        V = torch.where(pos_b, b / KtU, 0.0)
        big_u = torch.where(pos_a, U.log().abs(), 0.0).amax()
        big_v = torch.where(pos_b, V.log().abs(), 0.0).amax()
        if bool(torch.maximum(big_u, big_v) > _ABSORB):
            s = s + torch.where(pos_a, U.log(), 0.0)
            t = t + torch.where(pos_b, V.log(), 0.0)
            Kt = kernel(s, t)
            U, V = torch.ones_like(a), torch.ones_like(b)
    return s + torch.where(pos_a, U.log(), 0.0) - log_a, it, False


@torch.no_grad()
def _finish(K: torch.Tensor, b: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
            alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One exact log-domain iteration from ``alpha`` (finite potentials also where a weight is zero), then
    the L1 column violation of the resulting plan, whose rows are exact."""
    alpha = torch.where(torch.isfinite(alpha), alpha, 0.0)
    beta = _col_softmin(K, log_a + alpha)
    alpha = _row_softmin(K, log_b + beta)
    beta_check = _col_softmin(K, log_a + alpha)
    err = torch.linalg.vector_norm(b * torch.expm1(beta - beta_check).nan_to_num(0.0), ord=1, dim=-1)
    return alpha, beta, err


def sinkhorn(
    cost: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    reg: float = 0.1,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    f0: torch.Tensor | None = None,
    g0: torch.Tensor | None = None,
    check_every: int = 1,
    method: str = "absorb",
    warn: bool = True,
) -> SinkhornResult:
    """Solve entropic OT between ``a`` and ``b`` for ``cost`` with log-domain Sinkhorn iterations.

    ``P = diag(a) exp((f ⊕ g - C) / ε) diag(b)``, ``OT_ε = <P, C> + ε KL(P | a bᵀ) = <a, f> + <b, g>``.

    Args:
        cost: ``[..., n, m]`` finite cost matrix (leading dimensions are independent problems).
        a, b: marginals ``[n]`` / ``[m]`` or batched ``[..., n]`` / ``[..., m]``: non-negative, summing to
            one; uniform when ``None``. Gradients flow to ``cost`` only.
        reg: the entropic regularization ``ε > 0`` (same units as the cost).
        max_iter: iteration cap; reaching it emits :class:`SinkhornConvergenceWarning` (unless ``warn=False``).
        tol: stop when the L1 marginal violation ``Σ_i |(P 1)_i - a_i|`` is below ``tol`` for every problem.
        f0, g0: warm start from potentials of a previous (similar) problem, in this function's convention;
            ``f0`` wins when both are given (``g`` is recomputed from it first).
        check_every: test convergence every this many iterations (each test is O(n) but syncs a GPU).
        method: ``"absorb"`` (default): log-domain potentials with matrix-vector iterations on a stabilized
            kernel that is re-absorbed whenever a scaling grows past ``e^±10``, with a fall-back to
            log-domain steps where the kernel underflows (Schmitzer 2016) — the same fixed point, several
            times faster per iteration; ``"log"``: every half-step a ``logsumexp`` (POT's ``sinkhorn_log``).
        warn: emit the warning when ``max_iter`` is reached.

    Returns:
        :class:`SinkhornResult` with ``plan``, ``value = <plan, cost>``, ``objective``, ``f``, ``g``,
        ``iterations``, ``error``, ``converged``.

    Raises:
        ValueError: if ``reg <= 0``, the cost has NaN/inf or fewer than 2 dims, a marginal is negative, does
            not sum to one or has the wrong size, or a marginal requires grad.

    Example:
        >>> x, y = torch.randn(100, 2), torch.randn(80, 2)
        >>> res = sinkhorn(torch.cdist(x, y) ** 2, reg=0.1)
        >>> res.plan.sum(1)  # ≈ 1/100 each
        >>> res.value.backward()  # d<P, C>/dC through the converged potentials
    """
    if not torch.is_tensor(cost) or not cost.is_floating_point():
        raise ValueError(f"cost must be a floating-point tensor, got {type(cost).__name__}"
                         + (f" of dtype {cost.dtype}" if torch.is_tensor(cost) else ""))
    if cost.ndim < 2 or cost.shape[-1] == 0 or cost.shape[-2] == 0:
        raise ValueError(f"cost must have shape [..., n, m] with n, m >= 1, got {tuple(cost.shape)}")
    if torch.isnan(cost).any():
        raise ValueError("cost contains NaN")
    if not torch.isfinite(cost).all():
        raise ValueError("cost must be finite, got inf")
    check_positive("reg", reg)
    check_positive_int("max_iter", max_iter)
    check_positive("tol", tol)
    check_positive_int("check_every", check_every)
    check_choice("method", method, ("absorb", "log"))
    for name, w in (("a", a), ("b", b)):
        if torch.is_tensor(w) and w.requires_grad:
            raise ValueError(f"{name} requires grad, but sinkhorn differentiates with respect to the cost only; "
                             f"pass {name}.detach()")
    batch, n, m = cost.shape[:-2], cost.shape[-2], cost.shape[-1]
    a_ = _marginal("a", a, n, batch, cost)
    b_ = _marginal("b", b, m, batch, cost)
    log_a, log_b = a_.log(), b_.log()
    eps = float(reg)
    c = cost.detach()
    K = -c / eps

    with torch.no_grad():
        if f0 is not None:
            if f0.shape[-1] != n:
                raise ValueError(f"f0 must have {n} entries along its last dimension, got shape {tuple(f0.shape)}")
            alpha = (f0.detach().to(c) / eps).expand(*batch, n).clone()
        elif g0 is not None:
            if g0.shape[-1] != m:
                raise ValueError(f"g0 must have {m} entries along its last dimension, got shape {tuple(g0.shape)}")
            beta0 = (g0.detach().to(c) / eps).expand(*batch, m)
            alpha = -torch.logsumexp(K + (log_b + beta0)[..., None, :], dim=-1)
        else:
            alpha = c.new_zeros((*batch, n))
        if method == "absorb":
            alpha, iterations, converged = _iterate_absorb(K, a_, b_, log_a, log_b, alpha, max_iter, tol,
                                                           check_every)
        else:
            alpha, iterations, converged = _iterate_log(K, a_, log_a, log_b, alpha, max_iter, tol, check_every)
        alpha, beta, err = _finish(K, b_, log_a, log_b, alpha)
        f, g = alpha * eps, beta * eps
        # Normalize the gauge: (f + t, g - t) is the same plan; choose <a, f> = <b, g>.
        shift = 0.5 * ((a_ * f).sum(-1) - (b_ * g).sum(-1))
        f = f - shift[..., None]
        g = g + shift[..., None]
    if not converged and warn:
        warnings.warn(f"sinkhorn did not converge in max_iter={max_iter} iterations: marginal error "
                      f"{float(err.max()):.3g} >= tol={tol:g} (increase max_iter or reg, or warm-start with f0)",
                      SinkhornConvergenceWarning, stacklevel=2)
    if cost.requires_grad and torch.is_grad_enabled():
        f, g = _ImplicitPotentials.apply(cost, log_a, log_b, f, g, eps)
    return SinkhornResult(f=f, g=g, cost=cost, log_a=log_a, log_b=log_b, reg=eps, iterations=iterations,
                          error=err, converged=converged)


def sinkhorn_divergence(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    reg: float = 0.1,
    cost: str | CostFn = "l2",
    *,
    objective: str = "entropic",
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> torch.Tensor:
    """The debiased Sinkhorn divergence ``S_ε(α, β) = T(α, β) - ½ T(α, α) - ½ T(β, β)`` between point clouds.

    With ``objective="entropic"`` (default), ``T = OT_ε = <a, f> + <b, g>`` (Feydy et al. 2019, arXiv
    1810.08278): ``S_ε >= 0`` with equality iff ``α = β`` for the squared Euclidean cost, and it interpolates
    between OT (``ε -> 0``) and MMD (``ε -> ∞``). With ``objective="linear"``, ``T = <P_ε, C>`` (Genevay et
    al. 2018, arXiv 1706.00292, and POT's ``empirical_sinkhorn_divergence`` without its clipping at 0).
    Differentiable with respect to ``x`` and ``y``.

    Args:
        x, y: samples ``[n, ...]`` and ``[m, ...]``.
        a, b: sample weights (uniform when ``None``).
        reg: ``ε > 0``.
        cost: ``"l2"`` (squared Euclidean), ``"l1"`` or a callable ``(x, y) -> [n, m]``.
        objective: ``"entropic"`` or ``"linear"``.
        max_iter, tol: passed to :func:`sinkhorn`.

    Raises:
        ValueError: as :func:`sinkhorn`, or for an unknown ``objective``.

    Example:
        >>> sinkhorn_divergence(torch.randn(200, 2), torch.randn(150, 2) + 1.0, reg=0.05)
    """
    check_choice("objective", objective, ("entropic", "linear"))
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = resolve_cost(cost)

    def term(u: torch.Tensor, v: torch.Tensor, wu: torch.Tensor | None, wv: torch.Tensor | None) -> torch.Tensor:
        res = sinkhorn(fn(u, v), wu, wv, reg, max_iter=max_iter, tol=tol)
        return res.objective if objective == "entropic" else res.value

    return term(x, y, a, b) - 0.5 * term(x, x, a, a) - 0.5 * term(y, y, b, b)
