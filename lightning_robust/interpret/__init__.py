"""Interpretation (pure PyTorch): saliency maps, SmoothGrad and its certificate, second-order explanations.

Levine, Singla & Feizi (arXiv 1905.12105): sparsified SmoothGrad and its certified top-k robustness, the
top-k saliency attack. Singla, Wallace, Feng & Feizi (arXiv 1902.00407): the closed-form input Hessian of
ReLU networks, its spectrum, and CASO/CAFO group-feature explanations.
"""

from lightning_robust.interpret.attack import RandomSearchSaliencyAttack, TopKSaliencyAttack, topk_saliency_mass
from lightning_robust.interpret.saliency import (
    certified_topk_intersection,
    gradient_saliency,
    hoeffding_error,
    scale_saliency,
    scaled_smoothgrad,
    smoothgrad,
    sparsified_smoothgrad,
    sparsify_saliency,
    topk_intersection,
    topk_mask,
)
from lightning_robust.interpret.second_order import (
    HessianEigen,
    caso_solve,
    group_features,
    hessian_eigen_analysis,
    hessian_factor,
    hessian_vector_product,
    input_jacobian,
    relu_input_hessian,
    top_hessian_eigen,
)
from lightning_robust.interpret.softplus import softplus_surrogate

__all__ = [
    "HessianEigen",
    "RandomSearchSaliencyAttack",
    "TopKSaliencyAttack",
    "caso_solve",
    "certified_topk_intersection",
    "gradient_saliency",
    "group_features",
    "hessian_eigen_analysis",
    "hessian_factor",
    "hessian_vector_product",
    "hoeffding_error",
    "input_jacobian",
    "relu_input_hessian",
    "scale_saliency",
    "scaled_smoothgrad",
    "smoothgrad",
    "softplus_surrogate",
    "sparsified_smoothgrad",
    "sparsify_saliency",
    "top_hessian_eigen",
    "topk_intersection",
    "topk_mask",
    "topk_saliency_mass",
]
