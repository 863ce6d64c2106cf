"""The certified-radius training term (Singla & Feizi, arXiv 1902.01235)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from lightning_robust.certify import certify, simplex_hinge_loss
from lightning_robust.objectives.base import Objective, ObjectiveOutput, TrainingBatch
from lightning_robust.utils.modules import resolve_layer
from lightning_robust.utils.validation import check_choice, check_non_negative, check_positive, check_positive_int

__all__ = ["CertifiedRadius"]


class CertifiedRadius(Objective):
    """``weight · hinge`` that enlarges a closed-form robustness certificate of the training inputs.

    The simplex certificate is closed-form and differentiable, so training can enlarge it: ``"simplex"`` uses
    :func:`~lightning_robust.certify.simplex_hinge_loss` (hinges on the ``topk`` nearest facets of the certified
    polyhedron and on the signed distance to the linearized boundary of the true class); ``"lipschitz"`` the
    hinge ``relu(1 - r / radius)`` on the global-Lipschitz certificate ``r``. Logs ``certificate`` (mean
    radius, clamped at 0) and ``certificate_loss`` (the unweighted hinge).

    Args:
        weight: factor of the term (>= 0; 0 computes nothing).
        method: ``"simplex"`` (needs a piecewise-linear net; one forward pass per input dimension) or
            ``"lipschitz"`` (cheap).
        radius: target radius of the hinge (pixel-space L2 units).
        topk: nearest neuron facets in the simplex hinge.
        net: dotted path of the submodule to certify (``""`` = the module itself).

    Example:
        >>> Classifier(MLP(in_features=64, num_classes=10), objectives=[CrossEntropy(), CertifiedRadius(0.5)])
    """

    def __init__(self, weight: float = 1.0, method: str = "simplex", radius: float = 0.5, topk: int = 8,
                 net: str = "net") -> None:
        self.weight = float(check_non_negative("certificate_weight", weight))
        self.method = check_choice("certificate_method", method, ("simplex", "lipschitz"))
        self.radius = float(check_positive("certificate_radius", radius))
        self.topk = check_positive_int("certificate_topk", topk)
        if not isinstance(net, str):
            raise TypeError(f"net must be a dotted submodule name (str), got {type(net).__name__}")
        self.net = net

    def __call__(self, module: nn.Module, batch: TrainingBatch) -> ObjectiveOutput:
        if self.weight == 0:
            return batch.y.new_zeros((), dtype=batch.inputs.dtype), {}
        net = resolve_layer(module, self.net)
        x, y = batch.inputs, batch.y
        if self.method == "simplex":
            term, radius = simplex_hinge_loss(net, x, y, self.radius, topk=self.topk)
        else:
            radius = certify(net, x, y, self.method, signed=True)
            term = F.relu(1 - radius / self.radius).mean()
        logs = {"certificate": radius.detach().clamp_min(0).mean(), "certificate_loss": term.detach()}
        return self.weight * term, logs
