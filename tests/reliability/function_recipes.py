"""Valid required arguments for the public functions of the pure packages (tiny tensors and nets), so the
function sweep can call each one with a single numeric argument made bad."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lightning_robust.nets import MLP


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(4, 3, hidden=(5,)).double()


def _x() -> torch.Tensor:
    return torch.rand(2, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _points(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _labels(n: int = 20) -> torch.Tensor:
    return torch.arange(n) % 2


RECIPES: dict[str, Callable[[], dict[str, Any]]] = {
    # attacks
    "attack_loss": lambda: {"logits": torch.rand(2, 3), "y": torch.tensor([0, 1]), "loss": "cw"},
    "simplex_least_squares": lambda: {"features": torch.rand(3, 4), "target": torch.rand(4)},
    "simplex_projected_gradient": lambda: {"features": torch.rand(3, 4), "target": torch.rand(4)},
    # certify
    "certify": lambda: {"model": _net(), "x": _x()},
    "decision_boundary_certificate": lambda: {"model": _net(), "x": _x()},
    "local_affine_map": lambda: {"model": _net(), "x": _x()},
    "simplex_certificate": lambda: {"model": _net(), "x": _x()},
    "simplex_hinge_loss": lambda: {"model": _net(), "x": _x(), "y": torch.tensor([0, 1]), "radius": 0.5},
    # ot
    "kmeans": lambda: {"x": _points(10, 0), "k": 2},
    "sinkhorn": lambda: {"cost": torch.rand(3, 4, dtype=torch.float64)},
    "sinkhorn_divergence": lambda: {"x": _points(3, 0), "y": _points(4, 1)},
    "normalized_wasserstein_sinkhorn": lambda: {"x": _points(6, 0), "components": [_points(5, 1), _points(5, 2)]},
    "nw_two_sample_test": lambda: {"x": _points(8, 0), "y": _points(8, 1), "n_permutations": 5},
    "entropic_dual_objective": lambda: {"d_real": torch.rand(3), "d_fake": torch.rand(4), "cost": torch.rand(3, 4),
                                        "reg": 0.5},
    # interpret
    "smoothgrad": lambda: {"model": _net(), "x": _x(), "n_samples": 4},
    "scaled_smoothgrad": lambda: {"model": _net(), "x": _x(), "n_samples": 4},
    "sparsified_smoothgrad": lambda: {"model": _net(), "x": _x(), "n_samples": 4},
    "sparsify_saliency": lambda: {"grad": torch.rand(2, 4)},
    "certified_topk_intersection": lambda: {"saliency": torch.rand(2, 4), "k": 2, "radius": 0.1, "sigma": 0.5,
                                            "n_samples": 100},
    "hoeffding_error": lambda: {"d": 4, "n_samples": 100},
    "input_jacobian": lambda: {"model": _net(), "x": _x()},
    "relu_input_hessian": lambda: {"model": _net(), "x": _x()},
    "hessian_factor": lambda: {"model": _net(), "x": _x()},
    "hessian_eigen_analysis": lambda: {"model": _net(), "x": _x()},
    "top_hessian_eigen": lambda: {"model": _net(), "x": _x()},
    "group_features": lambda: {"model": _net(), "x": _x(), "n_iter": 2},
    "softplus_surrogate": lambda: {"model": _net()},
    # defenses
    "deep_knn_filter": lambda: {"features": torch.rand(20, 4), "labels": _labels(), "k": 3},
    "default_k": lambda: {"labels": _labels()},
    "l2_outlier_filter": lambda: {"features": torch.rand(20, 4), "labels": _labels()},
    "one_class_svm_filter": lambda: {"features": torch.rand(20, 4), "labels": _labels()},
    "random_eviction": lambda: {"features": torch.rand(20, 4), "labels": _labels()},
}
