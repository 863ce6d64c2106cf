"""Per-sample log-likelihood lower bound of an entropic GAN (Balaji et al., arXiv 1810.04147).

The paper gives a GAN an explicit model: latents ``X ~ f_X = N(0, I)`` and observations
``f(y | x) = C exp(-ℓ(y, G(x)) / λ)`` (a Gaussian ``N(G(x), λ/2 I)`` for the squared Euclidean cost, a Laplace
density for L1). For any distribution ``q`` over latents, Jensen's inequality gives the evidence lower bound

    log f_Y(y) >= E_q[log f_X(X)] - E_q[ℓ(y, G(X))] / λ + H(q) + log C,                          (ELBO)

with gap ``KL(q || f_{X|Y=y})``. The paper's *surrogate likelihood* takes ``q = P*_{X|Y=y}``, the conditional
of the entropic-OT coupling learned by the GAN, ``q(x) ∝ f_X(x) exp(-(D2(G(x)) + ℓ(y, G(x))) / λ)`` (``D1(y)``
is constant in ``x`` and cancels). Substituting ``q`` the bound simplifies to

    L(y) = log C + log E_{X~f_X}[exp(-(D2(G(X)) + ℓ(y, G(X))) / λ)] + E_q[D2(G(X))] / λ.

**Direction.** This is a *lower* bound on ``log f_Y(y)`` (the paper's Theorem 1 / Corollary; an ELBO), tight
when ``q`` is the true posterior, e.g. when the data follow the model and the critics are optimal (then
``D2`` is constant). The authors' ``evaluator.py`` names the same quantity ``upper_bound``; that name is a
misnomer. Tests check the direction and the gap against the closed form of a linear-Gaussian model.

**Estimation.** ``n_latents`` prior samples ``x_i`` (shared by all ``y``, so scores are comparable) give the
self-normalized importance-sampling estimate ``log C + LSE_i(s_i) - log n + Σ_i w_i D2_i / λ`` with
``s_i = -(D2_i + ℓ_i) / λ`` and ``w = softmax(s)``, accumulated over chunks of latents with a running
log-sum-exp so memory is ``O(chunk_size x batch_size)``. For the same latents it never exceeds the plain
Monte-Carlo estimate ``log C + LSE_i(-ℓ_i / λ) - log n`` of ``log f_Y(y)`` (``critics=None``), by Jensen.

``estimator="authors"`` reproduces the authors' evaluator instead: weights ``∝ f_X(x_i) exp(v_i / λ)`` on the
prior samples (their extra ``exp(-|x|^2/2)`` counts the prior twice, as if the samples were a uniform grid),
a discrete entropy, and no constants ``log C`` and ``-log n``: ``LSE_i(-|x_i|^2/2 - (D2_i + ℓ_i)/λ) + Σ w D2 / λ``.
It ranks samples but is not a bound on ``log f_Y``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_robust.ot.costs import COSTS, CostFn, cost_log_normalizer, resolve_cost
from lightning_robust.ot.sinkhorn import sinkhorn
from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.validation import check_choice, check_finite, check_positive, check_positive_int

__all__ = ["LikelihoodResult", "SoftCTransform", "entropic_log_likelihood", "fit_fake_potential"]

Potential = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LikelihoodResult:
    """Per-sample output of :func:`entropic_log_likelihood` (all tensors [B], float64, on ``y``'s device).

    Attributes:
        log_likelihood: the bound ``L(y)`` (or the authors' score for ``estimator="authors"``).
        expected_cost: ``E_q[ℓ(y, G(X))]`` under the importance weights.
        ess: effective sample size ``1 / Σ w_i^2`` of the weights (1 = one latent dominates; ``n_latents`` =
            uniform). A small ESS means the estimate rests on few latents.
        n_latents: number of latent samples used.
    """

    log_likelihood: torch.Tensor
    expected_cost: torch.Tensor
    ess: torch.Tensor
    n_latents: int


class SoftCTransform(nn.Module):
    """A fake-side potential from a Sinkhorn solution: ``D2(ŷ) = λ log Σ_j a_j exp((f_j - ℓ(y_j, ŷ)) / λ)``.

    This is minus the soft c-transform of the data-side potential ``f`` on the support ``y_j``: at the
    Sinkhorn fixed point it equals ``-g`` on the generated samples, and it extends ``-g`` to any ``ŷ``.
    """

    def __init__(self, support: torch.Tensor, potential: torch.Tensor, weights: torch.Tensor, reg: float,
                 cost: str | CostFn = "l2") -> None:
        super().__init__()
        check_positive("reg", reg)
        self.register_buffer("support", support.detach())
        self.register_buffer("potential", potential.detach())
        self.register_buffer("log_weights", weights.detach().log())
        self.reg = float(reg)
        self.cost_fn = resolve_cost(cost)

    support: torch.Tensor
    potential: torch.Tensor
    log_weights: torch.Tensor

    def forward(self, y_hat: torch.Tensor) -> torch.Tensor:
        c = self.cost_fn(self.support, y_hat.to(self.support))  # [n_support, B]
        z = self.log_weights[:, None] + (self.potential[:, None] - c) / self.reg
        return self.reg * torch.logsumexp(z, dim=0)


def _fake_potential(critics: Any) -> Potential | None:
    if critics is None:
        return None
    if hasattr(critics, "fake_potential"):
        return critics.fake_potential  # type: ignore[no-any-return]
    if isinstance(critics, (tuple, list)):
        if len(critics) != 2 or not all(callable(c) for c in critics):
            raise ValueError(f"critics as a sequence must be (D1, D2), two callables; got {len(critics)} items")
        return critics[1]  # type: ignore[no-any-return]
    if callable(critics):
        return critics  # type: ignore[no-any-return]
    raise ValueError("critics must be None, a DualCritic (with fake_potential), a pair (D1, D2) or a callable D2, "
                     f"got {type(critics).__name__}")


def _latent_shape(generator: Any, latent_dim: int | Sequence[int] | None) -> tuple[int, ...]:
    if latent_dim is None:
        latent_dim = getattr(generator, "latent_dim", None)
        if latent_dim is None:
            raise ValueError("latent_dim must be given (the generator has no `latent_dim` attribute)")
    shape = (latent_dim,) if isinstance(latent_dim, int) else tuple(latent_dim)
    for i, s in enumerate(shape):
        check_positive_int(f"latent_dim[{i}]" if len(shape) > 1 else "latent_dim", s)
    return shape


def _device_of(module: Any, fallback: torch.device) -> torch.device:
    if isinstance(module, nn.Module):
        for t in [*module.parameters(), *module.buffers()]:
            return t.device
    return fallback


def _dtype_of(module: Any, fallback: torch.dtype) -> torch.dtype:
    if isinstance(module, nn.Module):
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                return t.dtype
    return fallback if fallback.is_floating_point else torch.get_default_dtype()


@torch.no_grad()
def entropic_log_likelihood(
    generator: Callable[[torch.Tensor], torch.Tensor],
    critics: Any,
    y: torch.Tensor,
    n_latents: int = 4096,
    reg: float = 1.0,
    cost: str = "l2",
    *,
    latent_dim: int | Sequence[int] | None = None,
    latents: torch.Tensor | None = None,
    chunk_size: int = 1024,
    batch_size: int = 1024,
    estimator: str = "importance",
    seed: int = 0,
) -> LikelihoodResult:
    """Lower bound on ``log f_Y(y)`` for every sample of ``y`` under an entropic GAN's explicit model.

    ``L(y) = log C + log E_{f_X}[exp(-(D2(G(X)) + ℓ(y, G(X))) / λ)] + E_q[D2(G(X))] / λ <= log f_Y(y)`` with
    ``q = P*_{X|Y=y}`` (see the module docstring for the derivation and the estimator).

    Args:
        generator: ``G``: latents ``[k, *latent_shape]`` -> samples shaped like ``y[0]``. Run in eval mode
            (training flags are restored afterwards).
        critics: the fake-side potential ``D2``: a :class:`~lightning_robust.nets.DualCritic` (its
            ``fake_potential``), a pair ``(D1, D2)``, a callable ``D2``, or ``None`` for ``D2 = 0`` (then ``q`` is
            the prior and the result is the plain Monte-Carlo estimate of ``log f_Y``). ``D1`` is not needed.
        y: samples ``[B, ...]`` to score.
        n_latents: latent samples drawn from ``N(0, I)`` (ignored when ``latents`` is given).
        reg: ``λ`` of the model (the GAN's final regularization).
        cost: ``"l2"`` (squared Euclidean; Gaussian observation model) or ``"l1"`` (Laplace).
        latent_dim: latent size or shape; read from ``generator.latent_dim`` when omitted.
        latents: explicit latent samples ``[n, *latent_shape]`` from ``N(0, I)`` instead of drawing them.
        chunk_size: latents evaluated at a time (memory is ``chunk_size x batch_size`` costs).
        batch_size: samples of ``y`` scored at a time.
        estimator: ``"importance"`` (the bound) or ``"authors"`` (the authors' evaluator formula; not a bound).
        seed: seed of the latent draw (the same latents for every ``y`` and every call).

    Returns:
        :class:`LikelihoodResult`.

    Raises:
        ValueError: on bad sizes, ``reg <= 0``, an unknown cost / estimator, non-finite ``y`` or critics of
            the wrong form.

    Example:
        >>> res = entropic_log_likelihood(gan.generator, gan.discriminator, x_test, n_latents=4096, reg=0.1)
        >>> res.log_likelihood  # [B]; higher = more likely under the model
    """
    check_choice("cost", cost, COSTS)
    check_positive("reg", reg)
    check_positive_int("chunk_size", chunk_size)
    check_positive_int("batch_size", batch_size)
    check_choice("estimator", estimator, ("importance", "authors"))
    if not torch.is_tensor(y) or y.ndim < 1 or y.shape[0] == 0:
        raise ValueError(f"y must be a tensor of samples [B, ...] with B >= 1, got "
                         f"{tuple(y.shape) if torch.is_tensor(y) else type(y).__name__}")
    if not torch.isfinite(y).all():
        raise ValueError("y contains NaN or inf")
    d2_fn = _fake_potential(critics)
    device = _device_of(generator, y.device)
    shape = _latent_shape(generator, latent_dim)
    if latents is None:
        check_positive_int("n_latents", n_latents)
        g = torch.Generator().manual_seed(seed)
        latents = torch.randn(n_latents, *shape, generator=g, dtype=_dtype_of(generator, y.dtype))
    elif latents.ndim < 1 or tuple(latents.shape[1:]) != shape:
        raise ValueError(f"latents must have shape [n, {', '.join(map(str, shape))}], got {tuple(latents.shape)}")
    n = latents.shape[0]
    cost_fn = resolve_cost(cost)
    dim = int(y[0].numel())
    B = y.shape[0]
    f64 = torch.float64
    # Running log-sum-exp accumulators: max m, Σ e^{s-m}, Σ e^{s-m} D2, Σ e^{s-m} ℓ, Σ e^{2(s-m)}.
    run_max = torch.full((B,), -math.inf, dtype=f64, device=device)
    s0 = torch.zeros(B, dtype=f64, device=device)
    s_d2, s_cost, s_sq = s0.clone(), s0.clone(), s0.clone()
    y_dev = y.to(device)
    # critics may be plain callables (a potential function): only modules have a mode to set
    parts = [generator, critics, *(critics if isinstance(critics, (tuple, list)) else ())]
    with model_mode([m for m in parts if isinstance(m, nn.Module)], "eval"):
        for start in range(0, n, chunk_size):
            z = latents[start:start + chunk_size].to(device)
            y_hat = generator(z)
            d2 = (d2_fn(y_hat).reshape(-1).to(f64) if d2_fn is not None
                  else torch.zeros(z.shape[0], dtype=f64, device=device))
            prior = (-0.5 * z.reshape(z.shape[0], -1).to(f64).pow(2).sum(1)) if estimator == "authors" else None
            for b0 in range(0, B, batch_size):
                sl = slice(b0, b0 + batch_size)
                yb = y_dev[sl].to(y_hat.dtype)
                c = cost_fn(yb, y_hat).to(f64)  # [b, k]
                s = -(d2[None, :] + c) / reg
                if prior is not None:
                    s = s + prior[None, :]
                new_max = torch.maximum(run_max[sl], s.max(1).values)
                scale = torch.exp(run_max[sl] - new_max)
                e = torch.exp(s - new_max[:, None])
                s0[sl] = s0[sl] * scale + e.sum(1)
                s_d2[sl] = s_d2[sl] * scale + (e * d2[None, :]).sum(1)
                s_cost[sl] = s_cost[sl] * scale + (e * c).sum(1)
                s_sq[sl] = s_sq[sl] * scale**2 + (e * e).sum(1)
                run_max[sl] = new_max
    lse = run_max + s0.log()
    mean_d2 = s_d2 / s0
    ll = lse + mean_d2 / reg
    if estimator == "importance":
        ll = ll - math.log(n) + cost_log_normalizer(cost, dim, reg)
    return LikelihoodResult(log_likelihood=ll.to(y.device), expected_cost=(s_cost / s0).to(y.device),
                            ess=(s0**2 / s_sq).to(y.device), n_latents=n)


@torch.no_grad()
def fit_fake_potential(
    generator: Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    n_latents: int = 1024,
    reg: float = 1.0,
    cost: str = "l2",
    *,
    latent_dim: int | Sequence[int] | None = None,
    seed: int = 1,
    max_iter: int = 5000,
    tol: float = 1e-6,
) -> SoftCTransform:
    """The optimal fake-side potential ``D2`` for a fixed generator, by Sinkhorn instead of a trained critic.

    Solves the discrete entropic OT between the empirical data ``data`` and ``n_latents`` generated samples
    (uniform weights, cost ``ℓ``, ``ε = reg``) with :func:`~lightning_robust.ot.sinkhorn` and returns ``D2`` as
    the soft c-transform of the data-side potential (:class:`SoftCTransform`), usable as ``critics`` in
    :func:`entropic_log_likelihood`: the surrogate likelihood with the *exact* (empirical) entropic coupling.

    Raises:
        ValueError: as :func:`~lightning_robust.ot.sinkhorn` and for bad sizes.
    """
    check_finite("data", data)
    check_positive_int("n_latents", n_latents)
    device = _device_of(generator, data.device)
    shape = _latent_shape(generator, latent_dim)
    z = torch.randn(n_latents, *shape, generator=torch.Generator().manual_seed(seed),
                    dtype=_dtype_of(generator, data.dtype)).to(device)
    with model_mode([generator] if isinstance(generator, nn.Module) else [], "eval"):
        y_hat = generator(z)
    y = data.to(device=device, dtype=y_hat.dtype)
    res = sinkhorn(resolve_cost(cost)(y, y_hat), None, None, reg, max_iter=max_iter, tol=tol)
    weights = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=y.dtype, device=device)
    return SoftCTransform(y, res.f, weights, reg, cost)
