"""Robustness certificates for piecewise-linear (ReLU) networks (Singla & Feizi, arXiv 1902.01235).

``local_affine_map`` gives the exact affine map of a network on the activation polyhedron of an input;
``simplex_certificate`` (closed form, differentiable) and ``decision_boundary_certificate`` turn it into
sound per-sample L2 radii; ``lipschitz_bound`` is the global bound used outside the polyhedron and the
classical baseline. Pure PyTorch: no Lightning imports.
"""

from lightning_robust.certify.affine import LocalAffineMap, hyperplane_distance, local_affine_map, region_radius
from lightning_robust.certify.certificates import (
    CERTIFICATE_METHODS,
    certify,
    decision_boundary_certificate,
    decision_boundary_radius,
    local_linear_radius,
    simplex_certificate,
    simplex_hinge_loss,
    simplex_radius,
)
from lightning_robust.certify.lipschitz import LipschitzBound, lipschitz_bound, lipschitz_radius
from lightning_robust.certify.traced import NotPiecewiseLinearError

__all__ = [
    "CERTIFICATE_METHODS",
    "LipschitzBound",
    "LocalAffineMap",
    "NotPiecewiseLinearError",
    "certify",
    "decision_boundary_certificate",
    "decision_boundary_radius",
    "hyperplane_distance",
    "lipschitz_bound",
    "lipschitz_radius",
    "local_affine_map",
    "local_linear_radius",
    "region_radius",
    "simplex_certificate",
    "simplex_hinge_loss",
    "simplex_radius",
]
