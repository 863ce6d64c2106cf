"""Baselines for the certificate comparison: CROWN / Fast-Lin (L2 ball, ReLU MLPs) and a DDN minimum-norm attack.

CROWN (Zhang et al. 2018, arXiv 1811.00866) and Fast-Lin (Weng et al. 2018, arXiv 1804.09699) bound the
margin ``f_y - f_j`` over the ball ``||z - x||_2 <= eps`` by back-substituting linear relaxations of every
ReLU through the network; they differ in the lower relaxation of an unstable ReLU (``l < 0 < u``):
Fast-Lin uses the chord slope ``u / (u - l)`` for both bounds, CROWN-Ada picks slope 1 or 0 (whichever
is tighter for the neuron). The certified radius is the largest ``eps`` whose bound stays positive,
found by bisection. (auto_LiRPA does not install with current torch, hence this compact version.)

DDN (Rony et al. 2019, arXiv 1811.09600) is a strong minimum-norm L2 attack: steps of fixed length on
the normalized loss gradient, projected on a sphere whose radius shrinks while the point is adversarial
and grows otherwise; we finish with a bisection along the best perturbation found.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["crown_bounds", "crown_radius", "ddn_attack", "mlp_layers"]


def mlp_layers(net: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(W, b), ...]`` of a ``Flatten? -> (Linear -> ReLU)* -> Linear`` network (identity normalization only)."""
    mods = [m for m in net.modules() if not isinstance(m, (nn.Sequential, nn.Identity, nn.Flatten))
            and len(list(m.children())) == 0]
    layers, expect_linear = [], True
    for m in mods:
        if isinstance(m, nn.Linear) and expect_linear:
            layers.append((m.weight.detach(), m.bias.detach()))
            expect_linear = False
        elif isinstance(m, nn.ReLU) and not expect_linear:
            expect_linear = True
        else:
            raise ValueError(f"crown baseline supports Linear/ReLU MLPs only, found {type(m).__name__}")
    return layers


def _backsub(layers: list[tuple[torch.Tensor, torch.Tensor]], spec: torch.Tensor, upto: int,
             bounds: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, eps: torch.Tensor,
             fastlin: bool) -> torch.Tensor:
    """Lower bound of ``spec @ z_upto`` (``spec`` [B, R, n_upto]) over the L2 ball; returns [B, R]."""
    w, b = layers[upto]
    coef = spec @ w  # on a_{upto-1}
    const = spec @ b
    for k in range(upto - 1, -1, -1):
        lo, up = bounds[k]  # pre-activation bounds of z_k, [B, n_k]
        active, inactive = lo >= 0, up <= 0
        unstable = ~(active | inactive)
        denom = torch.where(unstable, up - lo, torch.ones_like(up))
        s_up = torch.where(active, 1.0, torch.where(unstable, up / denom, 0.0))
        s_lo = s_up if fastlin else torch.where(active, 1.0, torch.where(unstable, (up >= -lo).to(up.dtype), 0.0))
        pos, neg = coef.clamp_min(0), coef.clamp_max(0)
        # a <= s_up (z - l) on unstable neurons (bias -s_up l), a >= s_lo z
        const = const + (neg * (-s_up * torch.where(unstable, lo, torch.zeros_like(lo))).unsqueeze(1)).sum(-1)
        coef = pos * s_lo.unsqueeze(1) + neg * s_up.unsqueeze(1)  # on z_k
        w, b = layers[k]
        const = const + coef @ b
        coef = coef @ w  # on a_{k-1} (the input when k == 0)
    return torch.einsum("brd,bd->br", coef, x) + const - eps.view(-1, 1) * coef.norm(dim=-1)


def crown_bounds(layers: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, label: torch.Tensor,
                 eps: torch.Tensor, fastlin: bool = False) -> torch.Tensor:
    """Lower bounds ``[B, K]`` of ``f_y - f_j`` over ``||z - x|| <= eps`` (``+inf`` at ``j = y``)."""
    x = x.flatten(1)
    bounds: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k in range(len(layers) - 1):
        n = layers[k][0].shape[0]
        eye = torch.eye(n, dtype=x.dtype, device=x.device).expand(x.shape[0], n, n)
        lo = _backsub(layers, eye, k, bounds, x, eps, fastlin)
        up = -_backsub(layers, -eye, k, bounds, x, eps, fastlin)
        bounds.append((lo, up))
    k_out = layers[-1][0].shape[0]
    eye = torch.eye(k_out, dtype=x.dtype, device=x.device)
    spec = eye[label].unsqueeze(1) - eye.unsqueeze(0)  # [B, K, K]: rows e_y - e_j
    lb = _backsub(layers, spec, len(layers) - 1, bounds, x, eps, fastlin)
    return lb.masked_fill(F.one_hot(label, k_out).bool(), math.inf)


def crown_radius(layers: list[tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, label: torch.Tensor,
                 fastlin: bool = False, steps: int = 14, start: float = 0.5) -> torch.Tensor:
    """Largest certified L2 radius per sample by doubling then bisection on ``crown_bounds > 0``."""
    b = x.shape[0]
    lo = torch.zeros(b, dtype=x.dtype, device=x.device)
    hi = torch.full((b,), start, dtype=x.dtype, device=x.device)
    for _ in range(8):  # grow hi until it is not certified
        ok = crown_bounds(layers, x, label, hi, fastlin).amin(1) > 0
        if not ok.any():
            break
        lo = torch.where(ok, hi, lo)
        hi = torch.where(ok, hi * 2, hi)
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok = crown_bounds(layers, x, label, mid, fastlin).amin(1) > 0
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


def ddn_attack(model: nn.Module, x: torch.Tensor, label: torch.Tensor, steps: int = 300, gamma: float = 0.05,
               init_norm: float = 1.0, refine: int = 12) -> torch.Tensor:
    """L2 norm of the smallest adversarial perturbation found (``inf`` if none), images kept in [0, 1]."""
    b = x.shape[0]
    shape = (-1,) + (1,) * (x.ndim - 1)
    delta = torch.zeros_like(x)
    norm = torch.full((b,), init_norm, dtype=x.dtype, device=x.device)
    best = torch.full((b,), math.inf, dtype=x.dtype, device=x.device)
    best_delta = torch.zeros_like(x)
    for t in range(steps):
        alpha = 0.01 + 0.99 * (1 + math.cos(math.pi * t / steps)) / 2  # cosine-annealed step length
        delta.requires_grad_(True)
        logits = model(x + delta)
        loss = F.cross_entropy(logits, label, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            adv = logits.argmax(1) != label
            dn = delta.flatten(1).norm(dim=1)
            better = adv & (dn < best)
            best = torch.where(better, dn, best)
            best_delta = torch.where(better.view(shape), delta, best_delta)
            norm = torch.where(adv, norm * (1 - gamma), norm * (1 + gamma))
            g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
            delta = delta + alpha * g
            delta = delta * (norm / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).view(shape)
            delta = (x + delta).clamp(0, 1) - x
    with torch.no_grad():  # bisection along the best direction (the box stays satisfied by convexity)
        found = torch.isfinite(best)
        lo, hi = torch.zeros_like(best), torch.ones_like(best)
        for _ in range(refine):
            mid = (lo + hi) / 2
            adv = model(x + mid.view(shape) * best_delta).argmax(1) != label
            hi, lo = torch.where(adv, mid, hi), torch.where(adv, lo, mid)
        refined = hi * best_delta.flatten(1).norm(dim=1)
    return torch.where(found, torch.minimum(refined, best), best)
