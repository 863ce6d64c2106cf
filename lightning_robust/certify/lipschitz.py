"""Global L2 Lipschitz upper bounds of a piecewise-linear network and of its pairwise logit margins."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lightning_robust.certify.tracing import trace_model
from lightning_robust.utils.validation import check_finite

__all__ = ["LipschitzBound", "lipschitz_bound", "lipschitz_radius"]


@dataclass
class LipschitzBound:
    """Global L2 Lipschitz bounds of a network ``f``.

    Attributes:
        network: bound on ``||f(z) - f(z')|| / ||z - z'||`` (float64 scalar).
        margin: ``[K, K]`` bounds on the Lipschitz constant of each margin ``f_y - f_j``; when the last
            operation is a linear layer ``W h + b`` this is ``||W_y - W_j|| * Lip(h)``, otherwise
            ``sqrt(2) * network`` (since ``||e_y - e_j|| = sqrt(2)``). The diagonal is zero.
    """

    network: torch.Tensor
    margin: torch.Tensor


def lipschitz_bound(model: nn.Module, input_shape: Sequence[int], *, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None) -> LipschitzBound:
    """Upper-bound the global L2 Lipschitz constant of ``model`` and of its logit margins.

    The bound is the product, along the network, of per-layer bounds (sums at residual additions):
    the exact spectral norm for linear layers, the Sedghi et al. (arXiv 1805.10408) Fourier bound for
    zero-padded convolutions, ``max |gamma / sigma|`` for eval-mode BatchNorm, 1 for ReLU-type
    activations, Schur's test for pooling and padding, and ``sqrt(multiplicity)`` for max pooling. It is
    the "global Lipschitz" baseline certificate ``margin / L`` (Szegedy et al. 2014; Hein & Andriushchenko
    2017) and the outside-the-polyhedron ingredient of :func:`decision_boundary_certificate`. Computed in
    float64; differentiable in the parameters.

    Args:
        model: a piecewise-linear network (see :func:`local_affine_map` for the supported layers).
        input_shape: shape of one input without the batch dimension, e.g. ``(1, 28, 28)``; the
            convolution bounds depend on the spatial size.
        dtype, device: of the dummy input (default: those of the model's first parameter).

    Raises:
        NotPiecewiseLinearError: if the network applies an operation without a piecewise-linear rule.

    Example:
        >>> lipschitz_bound(MLP(in_features=2, num_classes=3), (2,)).margin.shape
        torch.Size([3, 3])
    """
    p = next(iter(model.parameters()), None)
    dtype = dtype or (p.dtype if p is not None else torch.get_default_dtype())
    device = device or (p.device if p is not None else "cpu")
    x = torch.zeros(1, *input_shape, dtype=dtype, device=device)
    out, _ = trace_model(model, x, tangent=None, track_lip=True)
    assert out.lip is not None
    k = out.value.shape[1]
    if out.head is not None:
        w, lip_in = out.head
        w64 = w.to(torch.float64)
        diff = w64.unsqueeze(1) - w64.unsqueeze(0)  # [K, K, H]
        # sqrt has an infinite derivative at 0 (the diagonal): route it around.
        sq = diff.pow(2).sum(-1)
        nz = sq > 0
        margin = torch.where(nz, sq, torch.ones_like(sq)).sqrt() * nz.to(sq.dtype) * lip_in
    else:
        margin = math.sqrt(2.0) * out.lip * (1 - torch.eye(k, dtype=torch.float64, device=out.lip.device))
    return LipschitzBound(network=out.lip, margin=margin)


def lipschitz_radius(logits: torch.Tensor, label: torch.Tensor, margin_lipschitz: torch.Tensor) -> torch.Tensor:
    """Global-Lipschitz certificate ``min_{j != y} (f_y(x) - f_j(x)) / L_yj`` (signed; negative if misclassified).

    Sound because ``f_y - f_j`` can fall by at most ``L_yj * ||delta||`` anywhere in the input space.

    Args:
        logits: ``[B, K]``.
        label: ``[B]`` the class to certify.
        margin_lipschitz: ``[K, K]`` bounds from :func:`lipschitz_bound` (``.margin``).
    """
    check_finite("logits", logits)
    check_finite("margin_lipschitz", margin_lipschitz, allow_posinf=True)
    m = logits.gather(1, label[:, None]) - logits  # [B, K]
    lip = margin_lipschitz.to(logits.dtype)[label]  # [B, K]
    other = torch.ones_like(m, dtype=torch.bool).scatter_(1, label[:, None], False)
    safe = torch.where(lip > 0, lip, torch.ones_like(lip))
    const = torch.where(m > 0, math.inf, torch.where(m < 0, -math.inf, 0.0)).to(m.dtype)
    r = torch.where(lip > 0, m / safe, const)
    r = torch.where(other, r, torch.full_like(r, math.inf))
    return r.min(dim=1).values
