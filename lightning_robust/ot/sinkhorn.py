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

import math
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
    """Sinkhorn stopped at ``max_iter`` before its plan-error bound (or the marginal error) fell below ``tol``."""


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
        converged: whether every problem of the batch met the stopping test at the target ``reg`` (see
            :func:`sinkhorn`).
        plan_error: the stopping rule's bound ``d`` at the stop: every plan entry is within a factor
            ``exp(±d)`` of the converged entropic plan (``inf`` when not converged).
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
    plan_error: float = math.inf

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


class _StopRule:
    """When to stop: a bound on the error of the plan from the sizes of successive potential updates.

    Let ``δ_k = osc(α_k - α_{k-1})`` (max minus min over the support of ``a``) be the Hilbert-metric size of
    iteration ``k``'s update of the scaled potential ``α = f / ε``. Sinkhorn's map contracts the Hilbert
    metric (Franklin & Lorenz 1989), so with the rate ``λ`` the remaining distance to the fixed point is at
    most ``δ_k λ / (1 - λ)``. We estimate ``λ`` by the larger of the last two observed ratios
    ``(δ_k / δ_j)^(1 / (k - j))`` (the asymptotic rate is reached quickly and the worst-case bound
    ``tanh(D / 4)²`` is useless at small ``ε``). A potential within Hilbert distance ``d`` of the fixed point
    gives a plan within a factor ``exp(±d)`` of the entropic plan entry by entry (the soft c-transforms are
    sup-norm non-expansive and commute with the gauge), so ``|P_ij - P*_ij| <= (e^d - 1) P*_ij`` and
    ``|<P - P*, C>| <= (e^d - 1) <P*, |C|>``. We stop when this bound and the row marginal's L1 violation
    are both below ``tol``. Updates below the rounding floor count as zero.
    """

    def __init__(self, tol: float, floor: float, stall_after: int | None = None) -> None:
        self.tol = tol
        self.floor = floor
        self.stall_after = stall_after
        self.stalled = False
        self.reset()
        self.bound = math.inf

    def reset(self) -> None:
        """Forget the observed rates (after a Newton step changed the iterates' trajectory)."""
        self.prev: tuple[int, float] | None = None
        self.rates: list[float] = []
        self.stalled = False

    def __call__(self, it: int, step: float, row_err: float) -> bool:
        if step <= self.floor:
            self.bound = 0.0
            return row_err <= max(self.tol, self.floor)
        rate = 1.0
        if self.prev is not None:
            rate = (step / self.prev[1]) ** (1.0 / (it - self.prev[0])) if self.prev[1] > 0 else 1.0
        self.prev = (it, step)
        self.rates.append(rate)
        lam = max(self.rates[-2:]) if len(self.rates) >= 2 else 1.0
        self.bound = step * lam / (1.0 - lam) if lam < 1.0 else math.inf
        done = max(self.bound, step) <= self.tol and row_err <= self.tol
        if not done and self.stall_after is not None and len(self.rates) >= self.stall_after:
            # Predicted iterations to reach tol at the observed rate; beyond _STALL a Newton step is cheaper.
            need = math.inf if lam >= 1.0 else math.log(self.tol / max(self.bound, step)) / math.log(lam)
            self.stalled = need > _STALL
        return done


Rule = _StopRule

#: Iterations observed before the rate is trusted, and the predicted remaining iterations beyond which the
#: final stage takes a Newton step instead.
_PROBE, _STALL = 20, 60
#: Newton steps solve a dense ``min(n, m)``-sized system: only below this size.
_NEWTON_MAX = 2048


def _osc(delta: torch.Tensor, mask: torch.Tensor) -> float:
    """Max over the batch of ``max - min`` of ``delta`` over ``mask``: the Hilbert size of an update."""
    hi = torch.where(mask, delta, -math.inf).amax(-1)
    lo = torch.where(mask, delta, math.inf).amin(-1)
    return float((hi - lo).nan_to_num(0.0, posinf=0.0, neginf=0.0).amax())


@torch.no_grad()
def _iterate_log(K: torch.Tensor, a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, alpha: torch.Tensor,
                 max_iter: int, rule: Rule, check_every: int) -> tuple[torch.Tensor, int, bool]:
    """Plain log-domain Sinkhorn on scaled potentials ``alpha = f / ε``, ``beta = g / ε`` (``K = -C / ε``).

    After the column pass the column marginal is exact, and the next row pass reveals the row marginal for
    free, ``(P 1)_i = a_i exp(alpha_i - alpha_new_i)``: the convergence test is O(n), not O(nm).
    """
    pos_a = a > 0
    log_a_alpha = log_a + alpha
    it = 0
    for it in range(1, max_iter + 1):
        beta = _col_softmin(K, log_a_alpha)
        log_a_alpha_new = log_a + _row_softmin(K, log_b + beta)
        done = False
        if it % check_every == 0:
            delta = torch.where(pos_a, log_a_alpha_new - log_a_alpha, 0.0)
            err = (a * torch.expm1(-delta)).abs().sum(-1)
            done = rule(it, _osc(delta, pos_a), float(err.amax()))
        log_a_alpha = log_a_alpha_new
        if done:
            return log_a_alpha - log_a, it, True
        if rule.stalled:
            return log_a_alpha - log_a, it, False
    return log_a_alpha - log_a, it, False


#: Absorb the scalings into the kernel once one exceeds ``exp(±_ABSORB)``: entries that underflowed in the
#: kernel then stay below ``1e-300 * exp(2 * _ABSORB)`` of the plan in float64 (``1e-38 * ...`` in float32).
_ABSORB = 10.0


@torch.no_grad()
def _iterate_absorb(K: torch.Tensor, a: torch.Tensor, b: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                    alpha: torch.Tensor, max_iter: int, rule: Rule, check_every: int) -> tuple[torch.Tensor, int, bool]:
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
    # Zero weights need masks (their scalings are 0); without them the loop skips every torch.where.
    zeros = not bool(pos_a.all()) or not bool(pos_b.all())
    s = log_a + alpha
    t = log_b + _col_softmin(K, s)
    lo, hi = math.exp(-_ABSORB), math.exp(_ABSORB)

    def kernel(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(K + s[..., :, None] + t[..., None, :])

    def alpha_of(s: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
        return s + (torch.where(pos_a, U.log(), 0.0) if zeros else U.log()) - log_a

    Kt = kernel(s, t)
    U = torch.ones_like(a)
    V = torch.ones_like(b)
    it = 0
    for it in range(1, max_iter + 1):
        KtV = (Kt @ V[..., None])[..., 0]
        check = it % check_every == 0
        stats: list[torch.Tensor] = []
        if check:
            # U KtV is the row marginal (the columns are exact here) and log(U KtV / a) is the update of alpha
            # this half-step makes: its oscillation is log(max ratio / min ratio). One sync for everything.
            rows = U * KtV
            ratio = rows / a
            err = (rows - a).abs().sum(-1)
            if zeros:
                ratio_hi = torch.where(pos_a, ratio, 0.0).amax(-1)
                ratio_lo = torch.where(pos_a, ratio, math.inf).amin(-1)
            else:
                ratio_hi, ratio_lo = ratio.amax(-1), ratio.amin(-1)
            stats = [(ratio_hi / ratio_lo).log().amax(), err.amax()]
        U_new = torch.where(pos_a, a / KtV, 0.0) if zeros else a / KtV
        KtU = (U_new[..., None, :] @ Kt)[..., 0, :]
        V_new = torch.where(pos_b, b / KtU, 0.0) if zeros else b / KtU
        if zeros:
            u_pos = torch.where(pos_a, U_new, 1.0)
            v_pos = torch.where(pos_b, V_new, 1.0)
        else:
            u_pos, v_pos = U_new, V_new
        stats += [torch.maximum(u_pos.amax(), v_pos.amax()), torch.minimum(u_pos.amin(), v_pos.amin())]
        values = torch.stack(stats).tolist()
        if check:
            step, row_err = values[0], values[1]
            step = math.inf if math.isnan(step) else step
            if rule(it, step, math.inf if math.isnan(row_err) else row_err):
                return alpha_of(s, U), it, True
            if rule.stalled:
                return alpha_of(s, U), it, False
        big, small = values[-2], values[-1]
        if not (math.isfinite(big) and small > 0.0):
            # A column (or row) of the stabilized kernel lost all its mass to underflow: redo this step in the
            # log domain from the last good state, then re-absorb.
            s = log_a + _row_softmin(K, t + (torch.where(pos_b, V.log(), 0.0) if zeros else V.log()))
            t = log_b + _col_softmin(K, s)
            Kt = kernel(s, t)
            U, V = torch.ones_like(a), torch.ones_like(b)
            continue
        U, V = U_new, V_new
        if big > hi or small < lo:
            s = s + (torch.where(pos_a, U.log(), 0.0) if zeros else U.log())
            t = t + (torch.where(pos_b, V.log(), 0.0) if zeros else V.log())
            Kt = kernel(s, t)
            U, V = torch.ones_like(a), torch.ones_like(b)
    return alpha_of(s, U), it, False


@torch.no_grad()
def _newton_semidual(K: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """One damped Newton step on the semi-dual in ``alpha`` (``beta`` the exact column update), in float64.

    With the columns exact, the row sums ``r(α) = P 1`` have the symmetric PSD Jacobian
    ``J = diag(r) - P diag(1/b) Pᵀ`` whose null space is the gauge ``1``; the Newton step solves
    ``(J + 1 1ᵀ / n) Δ = a - r`` and is halved until the row marginal's L1 error decreases (per problem). Near
    the fixed point this converges quadratically where Sinkhorn's rate tends to one (small ``ε``).
    """
    dtype = alpha.dtype
    K, log_a, log_b = K.double(), log_a.double(), log_b.double()
    pos_a = log_a > -math.inf
    a, b = log_a.exp(), log_b.exp()
    n = a.shape[-1]
    alpha = torch.where(pos_a & torch.isfinite(alpha.double()), alpha.double(), 0.0)

    def rows(al: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta = _col_softmin(K, log_a + al)
        P = torch.exp(log_a[..., :, None] + al[..., :, None] + log_b[..., None, :] + beta[..., None, :] + K)
        return P, P.sum(-1)

    P, r = rows(alpha)
    err = (r - a).abs().sum(-1)
    inv_b = torch.where(b > 0, 1.0 / b, 0.0)
    J = torch.diag_embed(r + (~pos_a).to(r.dtype)) - (P * inv_b[..., None, :]) @ P.transpose(-1, -2) + 1.0 / n
    delta = torch.linalg.solve(J, (a - r)[..., None])[..., 0]
    delta = torch.where(pos_a, delta.nan_to_num(0.0), 0.0)
    out = alpha.clone()
    pending = torch.ones_like(err, dtype=torch.bool)
    t = 1.0
    for _ in range(12):
        trial = alpha + t * delta
        _, r_t = rows(trial)
        better = pending & ((r_t - a).abs().sum(-1) < err)
        out = torch.where(better[..., None], trial, out)
        pending = pending & ~better
        if not bool(pending.any()):
            break
        t *= 0.5
    return out.to(dtype)


def _newton(K: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """A Newton step on the smaller side's semi-dual; returns ``alpha`` (rows exact if the columns' side ran)."""
    n, m = K.shape[-2], K.shape[-1]
    if n <= m:
        return _newton_semidual(K, log_a, log_b, alpha)
    a_ok = torch.where(torch.isfinite(alpha), alpha, 0.0)
    beta = _col_softmin(K, log_a + a_ok)
    beta = _newton_semidual(K.transpose(-1, -2), log_b, log_a, beta)
    return _row_softmin(K, log_b + beta)


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


def _schedule(c: torch.Tensor, reg: float, scaling: float | None, reg_start: float | None) -> list[float]:
    """The ε-scaling schedule: ``reg_start`` (default: the cost's spread ``max C - min C``, at which Sinkhorn
    contracts at rate ``tanh(1/2)² < 0.22``) times ``scaling^k`` down to ``reg``, which is always last."""
    if scaling is None:
        return [reg]
    start = float(c.amax() - c.amin()) if reg_start is None else reg_start
    regs: list[float] = []
    r = start
    while r > reg * (1.0 + 1e-9) and len(regs) < 200:
        regs.append(r)
        r *= scaling
    return [*regs, reg]


#: Intermediate ε-scaling stages stop at this plan-error bound: their potentials only need to start the next
#: stage near its fixed point. (A looser test, e.g. on the update's size alone, lets a stage stop in the slow
#: drift of weakly coupled blocks far from its solution, and the next, colder stage inherits the imbalance.)
_STAGE_TOL = 1e-2


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
    scaling: float | None = 0.5,
    reg_start: float | None = None,
    newton: bool = True,
    warn: bool = True,
) -> SinkhornResult:
    """Solve entropic OT between ``a`` and ``b`` for ``cost`` with log-domain Sinkhorn iterations.

    ``P = diag(a) exp((f ⊕ g - C) / ε) diag(b)``, ``OT_ε = <P, C> + ε KL(P | a bᵀ) = <a, f> + <b, g>``.

    ε-scaling (Kosowsky & Yuille 1994; Schmitzer 2016 §3.2; Feydy 2020): Sinkhorn's contraction rate tends to
    one as ``ε -> 0``, so a cold start at a small ``ε`` needs very many iterations. By default we solve
    loosely at ``ε_0 = max C - min C`` (where the iterations contract fast), then at ``ε_0 s, ε_0 s², ...``
    down to ``reg``, each stage warm-started from the last stage's potentials ``f, g`` (in cost units), and
    run the last stage to ``tol``. ``max_iter`` caps the iterations of all stages together.

    Stopping rule: at the target ``reg`` we stop when an a-posteriori bound on the *plan's* error, from the
    size of the last potential update and the observed contraction rate (see :class:`_StopRule`), is below
    ``tol``: every entry of the returned plan is then within a relative ``~tol`` of the entropic plan, the
    value ``<P, C>`` within ``~tol <P, |C|>``, and the row marginal's L1 error below ``tol`` too.

    With the defaults, problems down to ``reg = 1e-3 x`` the median cost converge within ``max_iter=1000``
    (tested against POT run to convergence, non-square, non-uniform weights) where Newton steps apply
    (``min(n, m) <= 2048``); larger problems at such small ``reg`` rely on ε-scaling alone and may need a
    larger ``max_iter`` (the warning says so).

    Args:
        cost: ``[..., n, m]`` finite cost matrix (leading dimensions are independent problems).
        a, b: marginals ``[n]`` / ``[m]`` or batched ``[..., n]`` / ``[..., m]``: non-negative, summing to
            one; uniform when ``None``. Gradients flow to ``cost`` only.
        reg: the entropic regularization ``ε > 0`` (same units as the cost).
        max_iter: cap on the iterations of all ε-stages together; reaching it emits
            :class:`SinkhornConvergenceWarning` (unless ``warn=False``).
        tol: the bound on the plan's relative error (and the row marginal's L1 error) at which to stop.
        f0, g0: warm start from potentials of a previous (similar) problem, in this function's convention;
            ``f0`` wins when both are given (``g`` is recomputed from it first). A warm start skips ε-scaling.
        check_every: test convergence every this many iterations (each test is O(n) but syncs a GPU).
        method: ``"absorb"`` (default): log-domain potentials with matrix-vector iterations on a stabilized
            kernel that is re-absorbed whenever a scaling grows past ``e^±10``, with a fall-back to
            log-domain steps where the kernel underflows (Schmitzer 2016) — the same fixed point, several
            times faster per iteration; ``"log"``: every half-step a ``logsumexp`` (POT's ``sinkhorn_log``).
        scaling: the ε-scaling factor in ``(0, 1)`` per stage; ``None`` runs at ``reg`` only.
        reg_start: the first stage's ``ε`` (default: ``max C - min C``); no scaling when ``<= reg``.
        newton: at the target ``reg``, when the observed Sinkhorn rate predicts more than 60 further
            iterations, take a damped Newton step on the semi-dual of the smaller side (a dense
            ``min(n, m)``-sized solve, used only when ``min(n, m) <= 2048``); Sinkhorn iterations then
            resume and certify the result with the same stopping rule.
        warn: emit the warning when ``max_iter`` is reached.

    Returns:
        :class:`SinkhornResult` with ``plan``, ``value = <plan, cost>``, ``objective``, ``f``, ``g``,
        ``iterations`` (all stages), ``error``, ``converged``, ``plan_error`` (the bound at the stop).

    Raises:
        ValueError: if ``reg <= 0``, ``scaling`` is not in ``(0, 1)``, the cost has NaN/inf or fewer than 2
            dims, a marginal is negative, does not sum to one or has the wrong size, or a marginal requires
            grad.

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
    if scaling is not None and not (isinstance(scaling, (int, float)) and 0.0 < float(scaling) < 1.0):
        raise ValueError(f"scaling must be a number in (0, 1) or None, got {scaling!r}")
    if reg_start is not None:
        check_positive("reg_start", reg_start)
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
    # Updates smaller than this are rounding noise of the potentials' representation.
    floor = 64 * torch.finfo(c.dtype).eps

    with torch.no_grad():
        warm = f0 is not None or g0 is not None
        regs = [eps] if warm else _schedule(c, eps, scaling, reg_start)
        if f0 is not None:
            if f0.shape[-1] != n:
                raise ValueError(f"f0 must have {n} entries along its last dimension, got shape {tuple(f0.shape)}")
            alpha = (f0.detach().to(c) / eps).expand(*batch, n).clone()
        elif g0 is not None:
            if g0.shape[-1] != m:
                raise ValueError(f"g0 must have {m} entries along its last dimension, got shape {tuple(g0.shape)}")
            beta0 = (g0.detach().to(c) / eps).expand(*batch, m)
            alpha = -torch.logsumexp(-c / eps + (log_b + beta0)[..., None, :], dim=-1)
        else:
            alpha = c.new_zeros((*batch, n))
        iterations, converged = 0, False
        rule = _StopRule(tol, floor)
        prev_reg = regs[0]
        for stage, r in enumerate(regs):
            last = stage == len(regs) - 1
            # Carry the potentials in cost units, f = ε α, across stages.
            alpha = torch.where(torch.isfinite(alpha), alpha * (prev_reg / r), 0.0)  # 0 where a_i = 0
            prev_reg = r
            K = -c / r
            use_newton = newton and min(n, m) <= _NEWTON_MAX
            rule = _StopRule(tol if last else max(tol, _STAGE_TOL), floor, _PROBE if use_newton else None)
            while True:
                budget = max_iter - iterations
                if budget <= 0:
                    break
                if method == "absorb":
                    alpha, used, ok = _iterate_absorb(K, a_, b_, log_a, log_b, alpha, budget, rule, check_every)
                else:
                    alpha, used, ok = _iterate_log(K, a_, log_a, log_b, alpha, budget, rule, check_every)
                iterations += used
                converged = ok and last
                if ok or not rule.stalled or iterations >= max_iter:
                    break
                # Sinkhorn's rate is too slow here (small ε): a Newton step (counted as one iteration), then
                # Sinkhorn iterations again, which certify the result with the same stopping rule.
                alpha = _newton(K, log_a, log_b, alpha)
                iterations += 1
                rule.reset()
        if prev_reg != eps:  # the budget ran out in an intermediate stage
            alpha = torch.where(torch.isfinite(alpha), alpha * (prev_reg / eps), alpha)
        K = -c / eps
        alpha, beta, err = _finish(K, b_, log_a, log_b, alpha)
        f, g = alpha * eps, beta * eps
        # Normalize the gauge: (f + t, g - t) is the same plan; choose <a, f> = <b, g>.
        shift = 0.5 * ((a_ * f).sum(-1) - (b_ * g).sum(-1))
        f = f - shift[..., None]
        g = g + shift[..., None]
    if not converged and warn:
        warnings.warn(f"sinkhorn did not converge in max_iter={max_iter} iterations: plan error bound "
                      f"{rule.bound:.3g}, marginal error {float(err.max()):.3g}, tol={tol:g} (increase max_iter "
                      f"or reg, or warm-start with f0)", SinkhornConvergenceWarning, stacklevel=2)
    if cost.requires_grad and torch.is_grad_enabled():
        f, g = _ImplicitPotentials.apply(cost, log_a, log_b, f, g, eps)
    return SinkhornResult(f=f, g=g, cost=cost, log_a=log_a, log_b=log_b, reg=eps, iterations=iterations,
                          error=err, converged=converged, plan_error=rule.bound if converged else math.inf)


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
        TypeError: if ``x`` or ``y`` is not a floating-point tensor.
        ValueError: as :func:`sinkhorn`; for empty or non-finite samples, mismatched sample shapes, or an
            unknown ``objective``.

    Example:
        >>> sinkhorn_divergence(torch.randn(200, 2), torch.randn(150, 2) + 1.0, reg=0.05)
    """
    check_choice("objective", objective, ("entropic", "linear"))
    for name, t in (("x", x), ("y", y)):
        if not torch.is_tensor(t):
            raise TypeError(f"{name} must be a floating-point tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.ndim == 0 or t.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one sample, got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} must be finite, got NaN or inf")
    if tuple(x.shape[1:]) != tuple(y.shape[1:]):
        raise ValueError(f"y has samples of shape {tuple(y.shape[1:])} but x has {tuple(x.shape[1:])}")
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = resolve_cost(cost)

    def term(u: torch.Tensor, v: torch.Tensor, wu: torch.Tensor | None, wv: torch.Tensor | None) -> torch.Tensor:
        res = sinkhorn(fn(u, v), wu, wv, reg, max_iter=max_iter, tol=tol)
        return res.objective if objective == "entropic" else res.value

    return term(x, y, a, b) - 0.5 * term(x, x, a, a) - 0.5 * term(y, y, b, b)
