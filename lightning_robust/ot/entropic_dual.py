"""The entropic-OT GAN objective of Balaji et al., "Entropic GANs meet VAEs" (arXiv 1810.04147), as pure functions.

The entropic GAN solves ``min_G min_{P ∈ Π(P_Y, P_Ŷ)} E_P[ℓ(Y, Ŷ)] + λ KL(P | P_Y ⊗ P_Ŷ)`` with ``Ŷ = G(X)``.
Its dual, estimated on a minibatch of ``n`` real samples ``y_j`` and ``m`` generated samples ``ŷ_i``, is

    max_{D1, D2}  mean_j D1(y_j) - mean_i D2(ŷ_i) - λ mean_{j,i} exp((D1(y_j) - D2(ŷ_i) - ℓ(y_j, ŷ_i)) / λ - 1),

and the optimal coupling is ``P*(y, ŷ) = P_Y(y) P_Ŷ(ŷ) exp((D1(y) - D2(ŷ) - ℓ(y, ŷ)) / λ - 1)``. This is the
authors' code (``gan_utils.strong_convex_func``, the ``-1`` being their ``/ e``); the paper writes the same
objective without the ``-1``, which only shifts ``D1`` by ``λ``. The generator then minimizes either the
*primal* cost ``E_{P*}[ℓ(Y, G(X))]`` with the coupling held fixed (the authors' ``--usePrimalLoss``, used in
their README) or the dual objective itself.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from lightning_robust.utils.validation import check_finite, check_positive

__all__ = ["entropic_coupling", "entropic_dual_objective", "primal_transport_cost", "scheduled_reg"]


def _check(d_real: torch.Tensor, d_fake: torch.Tensor, cost: torch.Tensor, reg: float) -> None:
    check_positive("reg", reg)
    if cost.shape != (d_real.numel(), d_fake.numel()):
        raise ValueError(f"cost must have shape [n_real, n_fake] = [{d_real.numel()}, {d_fake.numel()}], "
                         f"got {tuple(cost.shape)}")


def _log_coupling(d_real: torch.Tensor, d_fake: torch.Tensor, cost: torch.Tensor, reg: float) -> torch.Tensor:
    return (d_real.reshape(-1, 1) - d_fake.reshape(1, -1) - cost) / reg - 1.0


def _guarded_exp(t: torch.Tensor, limit: float) -> torch.Tensor:
    """``exp(t)`` for ``t <= limit``, continued by its tangent line above: finite values and gradients.

    At the dual optimum ``exp(t)`` is a density ratio of the coupling to the product of the marginals
    (at most the minibatch size), so the guard only acts on critics far from optimal, where a plain
    ``exp`` overflows float32 (``t > 88``) and turns one bad step into NaN weights.
    """
    capped = t.clamp(max=limit)
    return capped.exp() * (1.0 + (t - capped))


def entropic_dual_objective(d_real: torch.Tensor, d_fake: torch.Tensor, cost: torch.Tensor, reg: float,
                            exp_limit: float = 30.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The minibatch dual objective (to be *maximized* by the critics) and its parts.

    Args:
        d_real: ``D1(y_j)``, shape [n].
        d_fake: ``D2(ŷ_i)``, shape [m].
        cost: ``ℓ(y_j, ŷ_i)``, shape [n, m].
        reg: ``λ > 0``.
        exp_limit: exponents above this continue the exponential linearly (see ``_guarded_exp``); the
            objective is unchanged wherever ``(D1 - D2 - ℓ) / λ - 1 <= exp_limit``.

    Returns:
        ``(objective, parts)`` with parts ``"transport"`` (``mean D1 - mean D2``, the WGAN-like term),
        ``"smoothing"`` (``λ mean exp(...)``, the exponential penalty) and ``"mass"`` (``mean exp(...)``:
        the total mass of the implied coupling, 1 at the optimum).

    Raises:
        ValueError: if ``reg <= 0`` or the shapes disagree.
    """
    check_finite("d_real", d_real)
    check_finite("d_fake", d_fake)
    check_finite("cost", cost)
    _check(d_real, d_fake, cost, reg)
    check_positive("exp_limit", exp_limit)
    log_p = _log_coupling(d_real, d_fake, cost, reg)
    mass = _guarded_exp(log_p, exp_limit).mean()
    transport = d_real.mean() - d_fake.mean()
    smoothing = reg * mass
    return transport - smoothing, {"transport": transport, "smoothing": smoothing, "mass": mass}


def entropic_coupling(d_real: torch.Tensor, d_fake: torch.Tensor, cost: torch.Tensor, reg: float,
                      normalize: bool = False) -> torch.Tensor:
    """The coupling implied by the critics on the minibatch, ``exp((D1 - D2 - ℓ) / λ - 1) / (n m)`` ([n, m]).

    Its total is the ``mass`` of :func:`entropic_dual_objective` (1 when the critics are optimal). With
    ``normalize=True`` it is divided by that mass, computed as a softmax over all entries: the same
    weights up to one positive factor, and no overflow however far the critics are from optimal.
    """
    check_finite("d_real", d_real)
    check_finite("d_fake", d_fake)
    check_finite("cost", cost)
    _check(d_real, d_fake, cost, reg)
    log_p = _log_coupling(d_real, d_fake, cost, reg)
    if normalize:
        return torch.softmax(log_p.flatten(), 0).reshape(log_p.shape)
    return torch.exp(log_p - math.log(log_p.numel()))


def primal_transport_cost(coupling: torch.Tensor, cost: torch.Tensor) -> torch.Tensor:
    """``Σ_ji P_ji ℓ(y_j, ŷ_i)`` with the coupling treated as a constant (gradients reach the cost only).

    By the envelope theorem this has the gradient of the entropic OT cost with respect to the generator.
    """
    check_finite("coupling", coupling)
    check_finite("cost", cost)
    if coupling.shape != cost.shape:
        raise ValueError(f"coupling and cost must have the same shape, got {tuple(coupling.shape)} and "
                         f"{tuple(cost.shape)}")
    return (coupling.detach() * cost).sum()


def scheduled_reg(reg: float, generator_step: int, milestones: Sequence[int] = (49, 99, 199),
                  factors: Sequence[float] = (2.0, 1.6, 1.28)) -> float:
    """The regularization schedule of the authors' trainer: ``reg * factors[k]`` before ``milestones[k]``.

    With the defaults, ``λ`` is ``2λ`` for the first 49 generator iterations, then ``1.6λ`` until 99,
    ``1.28λ`` until 199 and ``λ`` afterwards (their ``Lambda*2``, ``*2*0.8``, ``*2*0.8*0.8`` warm-up).

    Raises:
        ValueError: if ``reg <= 0``, the lists differ in length, milestones are not increasing or a
            factor is not positive.
    """
    check_positive("reg", reg)
    if len(milestones) != len(factors):
        raise ValueError(f"reg_milestones and reg_factors must have the same length, got {len(milestones)} "
                         f"and {len(factors)}")
    if any(m1 >= m2 for m1, m2 in itertools.pairwise(milestones)):
        raise ValueError(f"reg_milestones must be strictly increasing, got {list(milestones)}")
    for i, f in enumerate(factors):
        check_positive(f"reg_factors[{i}]", f)
    for m, f in zip(milestones, factors):
        if generator_step < m:
            return reg * f
    return reg
