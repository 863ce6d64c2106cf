"""Simplex and decision-boundary robustness certificates for ReLU networks (Singla & Feizi, arXiv 1902.01235).

Both certificates are per-sample L2 radii ``r`` such that no input ``z`` with ``||z - x|| < r`` changes
the predicted class (a tie at distance exactly ``r`` is possible). They use the paper's key fact: inside
the activation polyhedron ``P(x)`` (see :mod:`lightning_robust.certify.affine`) the network is the affine
map ``W z + b``, so each margin ``m_j(z) = f_y(z) - f_j(z)`` is ``m_j(x) + g_j . (z - x)`` with
``g_j = W_y - W_j``.

Soundness. The radius ``m_j(x) / ||g_j||`` of the *local linear model* alone (the distance to the
linearized decision boundary) is a true bound only while the ball stays inside ``P(x)``: beyond the
polyhedron other neurons switch and the decision boundary can come much closer. Neither certificate
below ever returns that radius unchecked:

* :func:`simplex_certificate` is the radius of the largest ball around ``x`` inside the polyhedron
  ``P(x) ∩ {z : m_j(z) >= 0 for all j}``, whose facets are the neuron hyperplanes and the linearized
  decision hyperplanes: ``min(min_i c_i(x) / ||a_i||, min_j m_j(x) / ||g_j||)``. Closed form and
  differentiable in the input and the parameters (suitable for a training loss).
* :func:`decision_boundary_certificate` also follows paths that leave ``P(x)``: a path from ``x`` to an
  adversarial ``z`` either stays in ``P(x)`` (length ``>= m_j(x) / ||g_j||``) or first exits through a
  facet hyperplane ``H_i`` at a point ``p`` where the margin is still the linear one, after which the
  margin can fall at most at the global Lipschitz rate ``L_j`` (:func:`lipschitz_bound`); so the path is
  at least ``min_{p in H_i} ||p - x|| + max(0, m_j(p)) / L_j``, which has a closed form (see
  :func:`decision_boundary_radius`). It is never smaller than the simplex certificate nor than the global
  Lipschitz certificate ``m_j / L_j``, and equals the exact distance to the decision boundary whenever
  the linearized boundary is nearer than the polyhedron's boundary (``m / ||g|| <= region radius``).

Training: :func:`simplex_hinge_loss` is a differentiable surrogate that enlarges the simplex certificate
(used by ``Classifier(certificate_weight=...)``). Measured against global Lipschitz bounds, CROWN / Fast-Lin
and a DDN attack in ``benchmarks/bench_certificates.py`` (BENCHMARKS.md).

The paper's full text was not available offline while this was written; the constructions above are
derived from its abstract (a closed-form, differentiable certificate from the polyhedron in which the
network is linear, and a decision-boundary certificate) with complete soundness proofs in the docstrings.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from lightning_robust.certify.affine import hyperplane_distance, local_affine_map, region_radius
from lightning_robust.certify.lipschitz import LipschitzBound, lipschitz_bound, lipschitz_radius
from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.validation import check_choice, check_finite, check_positive_int

__all__ = [
    "CERTIFICATE_METHODS",
    "certify",
    "decision_boundary_certificate",
    "decision_boundary_radius",
    "local_linear_radius",
    "simplex_certificate",
    "simplex_hinge_loss",
    "simplex_radius",
]

CERTIFICATE_METHODS = ("simplex", "decision_boundary", "lipschitz")


def _margins(logits: torch.Tensor, weight: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       torch.Tensor]:
    """Margins ``m_j = f_y - f_j`` [B, K], their gradients ``g_j`` [B, K, D], and the mask ``j != y``."""
    m = logits.gather(1, label[:, None]) - logits
    g = weight.gather(1, label[:, None, None].expand(-1, 1, weight.shape[2])) - weight
    other = torch.ones_like(m, dtype=torch.bool).scatter_(1, label[:, None], False)
    return m, g, other


def _safe_norm(v: torch.Tensor, dim: int) -> torch.Tensor:
    sq = v.pow(2).sum(dim)
    nz = sq > 0
    return torch.where(nz, sq, torch.ones_like(sq)).sqrt() * nz.to(sq.dtype)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` for ``den >= 0``, with ``+-inf`` (or 0 for ``num == 0``) where ``den == 0``; NaN-free grads."""
    pos = den > 0
    safe = torch.where(pos, den, torch.ones_like(den))
    const = torch.where(num > 0, math.inf, torch.where(num < 0, -math.inf, 0.0)).to(num.dtype)
    return torch.where(pos, num / safe, const)


def local_linear_radius(logits: torch.Tensor, weight: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Distance to the *linearized* decision boundary, ``min_{j != y} m_j(x) / ||g_j||`` (signed).

    This is NOT a certificate on its own: it is exact only while the ball stays inside the activation
    polyhedron. It is a facet term of both certificates and a diagnostic in the benchmarks.

    Args:
        logits: ``[B, K]`` network output at ``x``.
        weight: ``[B, K, D]`` local Jacobian (:attr:`LocalAffineMap.weight`).
        label: ``[B]`` the class to certify.
    """
    check_finite("logits", logits)
    check_finite("weight", weight)
    m, g, other = _margins(logits, weight, label)
    r = _ratio(m, _safe_norm(g, 2))
    return torch.where(other, r, torch.full_like(r, math.inf)).min(dim=1).values


def simplex_radius(logits: torch.Tensor, weight: torch.Tensor, slack: torch.Tensor, normal_norm: torch.Tensor,
                   label: torch.Tensor) -> torch.Tensor:
    """Simplex certificate (signed) from a local affine map: the inradius of the certified polyhedron at ``x``.

    ``r = min( min_i c_i(x) / ||a_i||, min_{j != y} m_j(x) / ||g_j|| )``: the ball of radius ``r`` lies in
    ``P(x)`` (so the network equals its affine map on it) and on the side ``m_j >= 0`` of every linearized
    decision hyperplane, hence no point strictly inside it changes the class. Negative when ``label`` is
    not the predicted class (then it is the signed distance to the linearized boundary).

    Args:
        logits, weight, slack, normal_norm: fields of a :class:`LocalAffineMap`.
        label: ``[B]`` the class to certify.
    """
    check_finite("logits", logits)
    check_finite("weight", weight)
    check_finite("slack", slack, allow_posinf=True)
    check_finite("normal_norm", normal_norm)
    return torch.minimum(region_radius(slack, normal_norm), local_linear_radius(logits, weight, label))


def decision_boundary_radius(logits: torch.Tensor, weight: torch.Tensor, slack: torch.Tensor,
                             normal_norm: torch.Tensor, margin_proj: torch.Tensor, label: torch.Tensor,
                             margin_lipschitz: torch.Tensor) -> torch.Tensor:
    """Decision-boundary certificate (signed) from a local affine map and global margin Lipschitz bounds.

    Notation: facet ``i`` of ``P(x)`` is ``c_i(z) = c_i(x) + a_i . (z - x) >= 0`` with distance
    ``d_i = c_i(x) / ||a_i||`` and unit normal ``n_i = -a_i / ||a_i||`` (pointing from ``x`` to the facet);
    class ``j`` has margin ``m_j`` with local gradient ``g_j`` and global Lipschitz bound ``L_j >= ||g_j||``.

    Claim: every ``z`` with ``m_j(z) <= 0`` satisfies ``||z - x|| >= r_j`` where
    ``r_j = min(m_j(x) / ||g_j||, min_i psi_ij)`` and ``psi_ij = min_{q in H_i} ||q - x|| + max(0, l_j(q)) / L_j``
    with ``l_j(q) = m_j(x) + g_j . (q - x)`` the linear margin and ``H_i = {c_i = 0}``.

    Proof: follow the segment from ``x`` to ``z``. If it stays in ``P(x)``, ``m_j`` is linear on it and
    ``||z - x|| >= m_j(x) / ||g_j||``. Otherwise it leaves ``P(x)`` at a point ``p`` of some facet
    ``H_i`` where ``m_j(p) = l_j(p)``; from ``p`` on, ``m_j`` falls at most ``L_j`` per unit length, so
    ``||z - x|| = ||p - x|| + ||z - p|| >= ||p - x|| + max(0, l_j(p)) / L_j >= psi_ij``.

    Closed form of ``psi_ij`` (a 2-d problem in the span of ``n_i`` and ``g_j``): with
    ``gamma = g_j . n_i``, ``g_perp = sqrt(||g_j||^2 - gamma^2)`` and ``kappa = g_perp / L_j``, the minimum of
    ``phi(q) = ||q - x|| + l_j(q) / L_j`` over ``H_i`` is ``phi* = m_j / L_j + d_i (sqrt(1 - kappa^2) + gamma / L_j)``,
    attained at a point whose margin is ``e - g_perp * d_i * kappa / sqrt(1 - kappa^2)`` with
    ``e = m_j + gamma d_i``; the distance from ``x`` to ``H_i ∩ {l_j <= 0}`` is ``a = d_i`` if ``e <= 0``
    and ``sqrt(d_i^2 + (e / g_perp)^2)`` otherwise. Then ``psi_ij = min(phi*, a)`` if that minimizer has a
    non-negative margin and ``psi_ij = a`` otherwise (``psi = max(||q - x||, phi)`` is convex on ``H_i``).

    Args:
        logits, weight, slack, normal_norm: fields of a :class:`LocalAffineMap`.
        margin_proj: ``[B, K, M]`` inner products ``g_j . a_i`` (``probe_proj`` of a map computed with
            probes ``g_j = W_y - W_j``).
        label: ``[B]`` the class to certify.
        margin_lipschitz: ``[K, K]`` global Lipschitz bounds of ``f_y - f_j`` (:func:`lipschitz_bound`).

    Returns:
        ``[B]`` radii; negative when ``label`` is not the predicted class.
    """
    check_finite("logits", logits)
    check_finite("weight", weight)
    check_finite("slack", slack, allow_posinf=True)
    check_finite("normal_norm", normal_norm)
    check_finite("margin_proj", margin_proj)
    check_finite("margin_lipschitz", margin_lipschitz, allow_posinf=True)
    m, g, other = _margins(logits, weight, label)  # [B, K], [B, K, D], [B, K]
    gnorm = _safe_norm(g, 2)  # [B, K]
    lin = _ratio(m, gnorm)  # [B, K]
    lip = torch.maximum(margin_lipschitz.to(m.dtype)[label], gnorm)  # a valid bound is always >= ||g_j||
    dist = hyperplane_distance(slack, normal_norm)  # [B, M]
    valid = torch.isfinite(dist).unsqueeze(1)  # [B, 1, M]
    d = torch.where(valid, dist.unsqueeze(1), torch.zeros_like(dist.unsqueeze(1)))
    an = torch.where(normal_norm > 0, normal_norm, torch.ones_like(normal_norm)).unsqueeze(1)
    gamma = torch.where(valid, -margin_proj / an, torch.zeros_like(margin_proj))  # g_j . n_i
    mm, ll, gn = m.unsqueeze(2), lip.unsqueeze(2), gnorm.unsqueeze(2)
    l_safe = torch.where(ll > 0, ll, torch.ones_like(ll))
    gperp_sq = (gn.pow(2) - gamma.pow(2)).clamp_min(0)
    gp_pos = gperp_sq > 0
    gperp = torch.where(gp_pos, gperp_sq, torch.ones_like(gperp_sq)).sqrt() * gp_pos.to(gperp_sq.dtype)
    kappa = (gperp / l_safe).clamp(0, 1)
    om = 1 - kappa.pow(2)
    om_pos = om > 0
    sqrt_om = torch.where(om_pos, om, torch.ones_like(om)).sqrt() * om_pos.to(om.dtype)
    phi = mm / l_safe + d * (sqrt_om + gamma / l_safe)
    e = mm + gamma * d
    # margin at the minimizer of phi is >= 0  <=>  e * sqrt(1 - kappa^2) >= g_perp * d * kappa
    phi_ok = e * sqrt_om >= gperp * d * kappa
    gp_safe = torch.where(gp_pos, gperp, torch.ones_like(gperp))
    reach = torch.where(gp_pos, torch.sqrt(d.pow(2) + (e / gp_safe).pow(2)), torch.full_like(d, math.inf))
    a = torch.where(e <= 0, d, reach)
    psi = torch.where(phi_ok, torch.minimum(phi, a), a)
    psi = torch.where(valid, psi, torch.full_like(psi, math.inf))
    if psi.shape[2]:
        lin = torch.minimum(lin, psi.min(dim=2).values)
    r = torch.where(other, lin, torch.full_like(lin, math.inf))
    return r.min(dim=1).values


# --------------------------------------------------------------------------------------------------
# model-level API


def _check_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point batch [B, ...], got {getattr(x, 'shape', type(x).__name__)}")
    if not bool(torch.isfinite(x).all()):
        # A NaN/inf input has no neighbourhood: any radius computed from it would be garbage.
        raise ValueError("x contains NaN or inf; certificates need finite inputs")
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape != x.shape[:1] or y.is_floating_point()):
        raise ValueError(f"y must be an integer tensor of shape [{x.shape[0]}], got "
                         f"{getattr(y, 'shape', type(y).__name__)}")


@contextlib.contextmanager
def _applicable(x: torch.Tensor) -> Iterator[None]:
    """Report a model that cannot run on ``x`` (shape or dtype mismatch) as a ``ValueError`` naming ``x``."""
    try:
        yield
    except RuntimeError as err:
        raise ValueError(f"model cannot be applied to x of shape {tuple(x.shape)} and dtype {x.dtype}: "
                         f"{str(err).splitlines()[0]}") from None


def _groups(x: torch.Tensor, chunk_size: int) -> list[slice]:
    per = max(1, chunk_size // max(1, x[0].numel()))
    return [slice(i, min(i + per, x.shape[0])) for i in range(0, x.shape[0], per)]


def _rounding_guard(r: torch.Tensor) -> torch.Tensor:
    """Shrink positive radii by a relative ``1e-4`` (float32) / ``1e-10`` (float64) margin.

    The radii are computed in floating point from sums over thousands of terms; where a certificate is
    exact (the linearized boundary point lies in the activation region) rounding could otherwise put it a
    hair beyond the true distance.
    """
    rel = 1e-10 if r.dtype == torch.float64 else 1e-4
    return torch.where(r > 0, r * (1 - rel), r)


def _labels(logits: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    return logits.argmax(1) if y is None else y.to(logits.device)


def simplex_certificate(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *,
                        chunk_size: int = 4096, signed: bool = False) -> torch.Tensor:
    """Simplex certificate of Singla & Feizi (arXiv 1902.01235): closed form, differentiable, sound.

    ``r(x) = min( min_i c_i(x) / ||a_i||, min_{j != y} (f_y(x) - f_j(x)) / ||W_y - W_j|| )``: the inradius,
    around ``x``, of the polyhedron cut out by the neuron hyperplanes of the activation region ``P(x)``
    and the linearized decision hyperplanes (see :func:`simplex_radius` for the proof). No input ``z``
    with ``||z - x|| < r`` changes the prediction. Gradients flow to ``x`` and the parameters, so the
    certificate can be maximized by a training loss (``Classifier(certificate_weight=...)``).

    Args:
        model: a piecewise-linear network (ReLU, max/avg pooling, BatchNorm in eval mode, residuals, ...).
        x: inputs ``[B, ...]``.
        y: class to certify per input (default: the predicted class). If ``y`` is not the predicted class
            the radius is 0 (or negative with ``signed=True``).
        chunk_size: tangent rows propagated per pass (memory knob).
        signed: return the signed value (negative for misclassified inputs) instead of clamping at 0.

    Returns:
        ``[B]`` L2 radii in input units (shrunk by a relative 1e-4 in float32, 1e-10 in float64, against
        floating-point rounding); an empty ``[0]`` tensor for an empty batch.

    Raises:
        NotPiecewiseLinearError: for a non-piecewise-linear layer (softplus, GELU, ...), naming it.

    Example:
        >>> r = simplex_certificate(net, x)          # [B]
        >>> (net(x + 0.99 * r[:, None] * u).argmax(1) == net(x).argmax(1)).all()  # any unit u
        tensor(True)
    """
    _check_inputs(model, x, y)
    check_positive_int("chunk_size", chunk_size)
    if x.shape[0] == 0:
        return x.new_zeros(0)  # an empty batch has empty radii (the model is not run)
    out = []
    for sl in _groups(x, chunk_size):
        with _applicable(x):
            amap = local_affine_map(model, x[sl], chunk_size=chunk_size)
        label = _labels(amap.logits, None if y is None else y[sl])
        out.append(simplex_radius(amap.logits, amap.weight, amap.slack, amap.normal_norm, label))
    r = _rounding_guard(torch.cat(out))
    return r if signed else r.clamp_min(0)


def simplex_hinge_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float, *, topk: int = 8,
                       chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable training surrogate of the simplex certificate; returns ``(loss, certificate)``.

    The simplex certificate is the distance to the nearest facet of the certified polyhedron (neuron
    hyperplanes of ``P(x)`` and linearized decision hyperplanes). Maximizing that minimum directly moves
    one facet per sample at a time; as in the MMR regularizer of Croce, Andriushchenko & Hein (AISTATS
    2019, arXiv 1810.07481), this hinge pushes the ``topk`` nearest neuron facets and the nearest decision
    facet beyond ``radius``:

        loss = mean_b [ mean_{i in topk nearest} relu(1 - d_i / radius) + relu(1 - d_lin / radius) ],

    where ``d_lin`` is the signed distance to the linearized boundary of the true class ``y`` (negative when
    misclassified). With ``topk = 1`` both terms vanish exactly when the simplex certificate of ``y``
    reaches ``radius``.

    Args:
        model: a piecewise-linear network.
        x: inputs ``[B, ...]``; y: true labels ``[B]``.
        radius: target L2 radius (> 0).
        topk: number of nearest neuron facets in the hinge.
        chunk_size: memory knob of :func:`local_affine_map`.

    Returns:
        The scalar loss and the (signed) simplex certificates ``[B]`` of ``y``.
    """
    _check_inputs(model, x, y)
    check_positive_int("topk", topk)
    if not radius > 0:
        raise ValueError(f"radius must be a positive number, got {radius!r}")
    with _applicable(x):
        amap = local_affine_map(model, x, chunk_size=chunk_size)
    dist = hyperplane_distance(amap.slack, amap.normal_norm)
    lin = local_linear_radius(amap.logits, amap.weight, y).clamp_min(-10 * radius)
    loss = torch.relu(1 - lin / radius).mean()
    if dist.shape[1]:
        near = dist.topk(min(topk, dist.shape[1]), dim=1, largest=False).values
        loss = loss + torch.relu(1 - near / radius).mean(dim=1).mean()
    return loss, torch.minimum(region_radius(amap.slack, amap.normal_norm), lin)


def _logit_jacobian(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[B, K]`` and their Jacobian ``[B, K, D]`` by reverse mode (K backward passes), detached."""
    with torch.enable_grad(), model_mode(model, "eval"):
        xr = x.detach().requires_grad_(True)
        out = model(xr)
        rows = [torch.autograd.grad(out[:, k].sum(), xr, retain_graph=k + 1 < out.shape[1])[0].flatten(1)
                for k in range(out.shape[1])]
    return out.detach(), torch.stack(rows, dim=1)


def decision_boundary_certificate(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *,
                                  lipschitz: LipschitzBound | torch.Tensor | None = None, chunk_size: int = 4096,
                                  signed: bool = False) -> torch.Tensor:
    """Decision-boundary certificate: a sound lower bound on the L2 distance to the decision boundary.

    Combines the exact affine map inside the activation polyhedron with a global Lipschitz bound outside
    it (see :func:`decision_boundary_radius` for the statement and proof). Always at least the simplex
    certificate and the global Lipschitz certificate; exact when the linearized decision boundary is nearer
    than the polyhedron's boundary.

    Args:
        model: a piecewise-linear network.
        x: inputs ``[B, ...]``.
        y: class to certify (default: the predicted class); 0 (or negative with ``signed``) if not predicted.
        lipschitz: precomputed :func:`lipschitz_bound` of the model (or its ``[K, K]`` margin bounds) for
            this input shape; computed here when omitted (costly for large convolutions: pass it in loops).
        chunk_size: tangent rows propagated per pass (memory knob).
        signed: return the signed value instead of clamping at 0.

    Returns:
        ``[B]`` L2 radii.

    Raises:
        NotPiecewiseLinearError: for a non-piecewise-linear layer, naming it.
        ValueError: if ``lipschitz`` has the wrong shape.

    Example:
        >>> lb = lipschitz_bound(net, x.shape[1:])
        >>> r = decision_boundary_certificate(net, x, lipschitz=lb)
    """
    _check_inputs(model, x, y)
    check_positive_int("chunk_size", chunk_size)
    if x.shape[0] == 0:
        return x.new_zeros(0)
    if lipschitz is None:
        with _applicable(x):
            lipschitz = lipschitz_bound(model, tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    lmat = lipschitz.margin if isinstance(lipschitz, LipschitzBound) else lipschitz
    out = []
    for sl in _groups(x, chunk_size):
        xs = x[sl]
        with _applicable(x):
            logits0, jac = _logit_jacobian(model, xs)
        k = jac.shape[1]
        if lmat.shape != (k, k):
            raise ValueError(f"lipschitz must be a LipschitzBound or a [K, K] = [{k}, {k}] tensor, got "
                             f"{tuple(lmat.shape)}")
        label = _labels(logits0, None if y is None else y[sl])
        probes = _margins(logits0, jac.to(xs.dtype), label)[1]
        amap = local_affine_map(model, xs, probes=probes, chunk_size=chunk_size)
        # The probes came from reverse mode; the certificate must use the traced map's own gradients.
        # They agree except where a ReLU input is exactly 0 (then the radius is limited by that facet
        # anyway); recompute the projections if they ever differ.
        g_traced = _margins(amap.logits, amap.weight, label)[1]
        proj = amap.probe_proj
        if not torch.allclose(g_traced.detach(), probes, rtol=1e-4, atol=1e-6 * float(probes.abs().max() + 1)):
            proj = local_affine_map(model, xs, probes=g_traced.detach(), chunk_size=chunk_size).probe_proj
        assert proj is not None
        out.append(decision_boundary_radius(amap.logits, amap.weight, amap.slack, amap.normal_norm, proj, label,
                                            lmat))
    r = _rounding_guard(torch.cat(out))
    return r if signed else r.clamp_min(0)


def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, method: str = "simplex", *,
            lipschitz: LipschitzBound | torch.Tensor | None = None, chunk_size: int = 4096,
            signed: bool = False) -> torch.Tensor:
    """Certified L2 radii by ``method``: ``"simplex"``, ``"decision_boundary"`` or ``"lipschitz"`` (baseline).

    Raises:
        ValueError: on an unknown ``method``.
    """
    check_choice("method", method, CERTIFICATE_METHODS)
    if method == "simplex":
        return simplex_certificate(model, x, y, chunk_size=chunk_size, signed=signed)
    if method == "decision_boundary":
        return decision_boundary_certificate(model, x, y, lipschitz=lipschitz, chunk_size=chunk_size, signed=signed)
    _check_inputs(model, x, y)
    if x.shape[0] == 0:
        return x.new_zeros(0)
    if lipschitz is None:
        with _applicable(x):
            lipschitz = lipschitz_bound(model, tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    lmat = lipschitz.margin if isinstance(lipschitz, LipschitzBound) else lipschitz
    with model_mode(model, "eval"):
        logits = model(x)
    r = _rounding_guard(lipschitz_radius(logits, _labels(logits, y), lmat))
    return r if signed else r.clamp_min(0)
