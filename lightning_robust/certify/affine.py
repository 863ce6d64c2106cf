"""The local affine map of a ReLU network at ``x`` and the polyhedron on which it is exact.

Singla & Feizi, "Robustness Certificates Against Adversarial Examples for ReLU Networks" (arXiv
1902.01235), build their certificates on the fact that a ReLU network is linear inside a polyhedron
around each input. For an input ``x`` with activation pattern ``s`` (the sign of every ReLU input, the
winner of every max-pooling window) the network equals ``f(z) = W z + b`` on

    P(x) = { z : c_i(z) = c_i(x) + a_i . (z - x) >= 0 for every neuron / window constraint i },

where ``c_i`` is the ReLU input multiplied by its sign at ``x`` (or winner minus competitor for max
pooling), computed with the earlier layers' patterns frozen. On ``P(x)`` every frozen pattern is
respected (by induction over layers, ties at zero being harmless since ReLU(0) = 0), so the network and
its affine map agree there. ``P(x)`` is convex, ``x`` lies in it, and the largest L2 ball around ``x``
inside it has radius ``min_i c_i(x) / ||a_i||`` (the distance to the nearest facet hyperplane).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_robust.certify.traced import NotPiecewiseLinearError
from lightning_robust.certify.tracing import trace_model
from lightning_robust.utils.validation import check_finite, check_positive_int

__all__ = ["LocalAffineMap", "NotPiecewiseLinearError", "local_affine_map"]


@dataclass
class LocalAffineMap:
    """The network's affine map on the activation polyhedron of each input in a batch.

    Attributes:
        weight: ``[B, K, D]`` Jacobian of the logits w.r.t. the flattened input (exact inside ``P(x)``).
        bias: ``[B, K]`` with ``logits = weight @ x.flatten(1) + bias``.
        logits: ``[B, K]`` the network's output at ``x``.
        slack: ``[B, M]`` constraint values ``c_i(x) >= 0`` (``+inf`` for entries that never bind).
        normal_norm: ``[B, M]`` norms ``||a_i||`` of the constraint gradients.
        probe_proj: ``[B, P, M]`` inner products ``<probe_p, a_i>`` when probes were given, else ``None``.
        normals: ``[B, M, D]`` the constraint gradients ``a_i`` when ``keep_normals=True``, else ``None``.
        layers: ``(layer description, number of constraints)`` in network order.
        x_flat: ``[B, D]`` the flattened inputs the map was computed at.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    logits: torch.Tensor
    slack: torch.Tensor
    normal_norm: torch.Tensor
    probe_proj: torch.Tensor | None
    normals: torch.Tensor | None
    layers: list[tuple[str, int]]
    x_flat: torch.Tensor

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """Evaluate the affine maps at ``z`` (``[B, ...]``, one point per input): ``W_b z_b + b_b``."""
        return torch.einsum("bkd,bd->bk", self.weight, z.flatten(1).to(self.weight.dtype)) + self.bias

    def hyperplane_distance(self) -> torch.Tensor:
        """``[B, M]`` distance from ``x`` to each facet hyperplane ``c_i = 0`` (``inf`` if it never binds)."""
        return hyperplane_distance(self.slack, self.normal_norm)

    def region_radius(self) -> torch.Tensor:
        """``[B]`` radius of the largest L2 ball around ``x`` inside ``P(x)`` (``inf`` without constraints)."""
        return region_radius(self.slack, self.normal_norm)

    def contains(self, z: torch.Tensor, tol: float = 0.0) -> torch.Tensor:
        """``[B]`` whether ``z_b`` satisfies every constraint of ``P(x_b)`` (needs ``keep_normals=True``)."""
        if self.normals is None:
            raise ValueError("contains() needs the constraint normals: call local_affine_map(..., keep_normals=True)")
        if self.normals.shape[1] == 0:
            return torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        c = self.slack + torch.einsum("bmd,bd->bm", self.normals, (z.flatten(1) - self.x_flat).to(self.normals.dtype))
        c = torch.where(torch.isfinite(self.slack), c, torch.zeros_like(c))
        return (c >= -tol).all(dim=1)


def hyperplane_distance(slack: torch.Tensor, normal_norm: torch.Tensor) -> torch.Tensor:
    """Distances ``c_i(x) / ||a_i||`` to the facet hyperplanes; ``inf`` where a constraint cannot bind.

    A constraint with ``a_i = 0`` is constant on the whole input space (it holds everywhere since it holds
    at ``x``), and a ``+inf`` slack marks a padding entry; neither limits the polyhedron.
    """
    check_finite("slack", slack, allow_posinf=True)
    check_finite("normal_norm", normal_norm)
    valid = torch.isfinite(slack) & (normal_norm > 0)
    safe = torch.where(valid, normal_norm, torch.ones_like(normal_norm))
    return torch.where(valid, slack.clamp_min(0) / safe, torch.full_like(slack, math.inf))


def region_radius(slack: torch.Tensor, normal_norm: torch.Tensor) -> torch.Tensor:
    """Radius of the largest L2 ball around ``x`` inside the activation polyhedron: ``min_i c_i(x) / ||a_i||``.

    The complement of ``P(x)`` is the union of the open half-spaces ``c_i < 0``, and the distance from
    ``x`` to such a half-space is exactly ``c_i(x) / ||a_i||``.
    """
    check_finite("slack", slack, allow_posinf=True)
    check_finite("normal_norm", normal_norm)
    d = hyperplane_distance(slack, normal_norm)
    if d.shape[1] == 0:
        return torch.full(d.shape[:1], math.inf, dtype=d.dtype, device=d.device)
    return d.min(dim=1).values


def local_affine_map(
    model: nn.Module,
    x: torch.Tensor,
    *,
    probes: torch.Tensor | None = None,
    keep_normals: bool = False,
    chunk_size: int = 4096,
) -> LocalAffineMap:
    """The local affine map ``f(z) = W z + b`` of a piecewise-linear network at each input of a batch.

    Runs the model's own ``forward`` (in eval mode, restored afterwards) on a tracing stand-in that pushes
    the identity basis of the input space through every layer's linear part with the activation pattern
    of ``x`` frozen (forward-mode differentiation, exact up to float rounding), and collects every facet
    ``c_i(z) = c_i(x) + a_i . (z - x) >= 0`` of the activation polyhedron ``P(x)``: one per ReLU /
    LeakyReLU input, two per clamp / ReLU6 / Hardtanh input, and winner-minus-competitor for every
    element of every max-pooling window. Supported: Linear, Conv1d/2d/3d, BatchNorm (eval), ReLU,
    LeakyReLU, ReLU6, Hardtanh, clamp, max pooling (1-d, 2-d), average and adaptive average pooling,
    Flatten / reshape / indexing / padding / concatenation / permutes, residual additions, Dropout (eval),
    and multiplication or division by constants (e.g. :class:`~lightning_robust.nets.Normalize`).

    Args:
        model: a network mapping ``[B, ...]`` inputs to logits ``[B, K]``.
        x: the inputs.
        probes: optional ``[B, P, D]`` vectors; their inner products with every constraint gradient
            ``a_i`` are accumulated into ``probe_proj`` without storing the ``[B, M, D]`` gradients.
        keep_normals: also return the constraint gradients ``[B, M, D]`` (memory ``B * M * D``).
        chunk_size: tangent rows (samples x input directions) propagated per pass; lower it to save memory.

    Returns:
        A :class:`LocalAffineMap`; gradients flow to ``x`` and the parameters (it is differentiable).

    Raises:
        NotPiecewiseLinearError: if the network applies an operation that is not piecewise linear (e.g.
            softplus, GELU, train-mode BatchNorm); the message names the layer.
        ValueError: on a bad ``x``, ``probes`` or ``chunk_size``.

    Example:
        >>> net = MLP(in_features=2, num_classes=3, hidden=(16,)).eval()
        >>> amap = local_affine_map(net, torch.rand(4, 2))
        >>> torch.allclose(amap(x), net(x), atol=1e-5)
        True
    """
    check_finite("x", x)
    check_finite("probes", probes)
    check_positive_int("chunk_size", chunk_size)
    if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a batch of inputs [B, ...] with B >= 1, got {getattr(x, 'shape', x)!r}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    b = x.shape[0]
    d = x[0].numel()
    if probes is not None and (probes.ndim != 3 or probes.shape[0] != b or probes.shape[2] != d):
        raise ValueError(f"probes must have shape [B, P, D] = [{b}, P, {d}], got {tuple(probes.shape)}")
    per_pass = max(1, chunk_size // b)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)

    weight_cols: list[torch.Tensor] = []
    normal_cols: list[torch.Tensor] = []
    sq: torch.Tensor | None = None
    proj: torch.Tensor | None = None
    logits = slack = None
    layers: list[tuple[str, int]] = []
    for start in range(0, d, per_pass):
        stop = min(d, start + per_pass)
        # Batch dimension 1: the tangent is shared by all samples until the first piecewise-linear layer.
        tangent = eye[start:stop].reshape(1, stop - start, *x.shape[1:])
        out, state = trace_model(model, x, tangent)
        assert out.tangent is not None
        weight_cols.append(out.tangent.expand(b, *out.tangent.shape[1:]).transpose(1, 2))  # [B, K, T]
        if state.constraints:
            normals = torch.cat([c.normal for c in state.constraints if c.normal is not None], dim=2)  # [B, T, M]
        else:
            normals = x.new_zeros(b, stop - start, 0)
        part = normals.pow(2).sum(1)
        sq = part if sq is None else sq + part
        if probes is not None:
            pp = torch.einsum("bpt,btm->bpm", probes[:, :, start:stop].to(normals.dtype), normals)
            proj = pp if proj is None else proj + pp
        if keep_normals:
            normal_cols.append(normals.transpose(1, 2))
        if logits is None:
            logits = out.value
            slack = (torch.cat([c.slack for c in state.constraints], dim=1) if state.constraints
                     else x.new_zeros(b, 0))
            layers = [(c.layer, int(c.slack.shape[1])) for c in state.constraints]
    assert logits is not None and slack is not None and sq is not None
    weight = torch.cat(weight_cols, dim=2)
    bias = logits - torch.einsum("bkd,bd->bk", weight, x.flatten(1))
    # sqrt has an infinite derivative at 0: route zero norms (constant constraints) around it.
    nonzero = sq > 0
    norm = torch.where(nonzero, sq, torch.ones_like(sq)).sqrt() * nonzero.to(sq.dtype)
    return LocalAffineMap(
        weight=weight, bias=bias, logits=logits, slack=slack, normal_norm=norm, probe_proj=proj,
        normals=torch.cat(normal_cols, dim=2) if keep_normals else None, layers=layers, x_flat=x.flatten(1),
    )
