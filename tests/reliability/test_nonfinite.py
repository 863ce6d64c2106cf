"""Every public function of the pure packages and every metric refuses NaN / inf inputs (issue 18).

Each function is called once on valid tiny inputs (the recipes of the numeric-argument sweep, plus the
ones below for functions without numeric arguments), then once per floating-point tensor argument with one
entry replaced by NaN, +inf and -inf: each call must raise a ``ValueError`` naming that argument. A NaN
image used to get saliency maps, a Hessian and a certified top-k overlap of 6; now it gets an error.
Arguments where ``+inf`` is meaningful (a constraint that never binds, an unbounded certified radius) are
checked with NaN and ``-inf`` only.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from lightning_robust.metrics import CertifiedAccuracy, RobustAccuracy, TopKIntersection
from lightning_robust.nets import MLP
from tests.reliability.function_recipes import RECIPES

PACKAGES = ("nets", "attacks", "certify", "ot", "interpret", "defenses", "metrics")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP(4, 3, hidden=(5,)).double()


def _x(b: int = 2, d: int = 4) -> torch.Tensor:
    return torch.rand(b, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _img() -> torch.Tensor:
    return torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))


def _affine() -> dict[str, torch.Tensor]:
    from lightning_robust.certify import local_affine_map

    m = local_affine_map(_net(), _x())
    return {"logits": m.logits.detach(), "weight": m.weight.detach(), "slack": m.slack.detach(),
            "normal_norm": m.normal_norm.detach()}


def _lipschitz() -> torch.Tensor:
    from lightning_robust.certify import lipschitz_bound

    return lipschitz_bound(_net(), (4,)).margin


def _features_net() -> Any:
    from lightning_robust.metrics import PrecomputedFeatures

    return PrecomputedFeatures(4)


EXTRA: dict[str, Callable[[], dict[str, Any]]] = {
    # attacks
    "cieluv_to_rgb": lambda: {"luv": torch.rand(2, 3, 4, 4) * 50},
    "rgb_to_cieluv": lambda: {"x": _img()},
    "rgb_to_yuv": lambda: {"x": _img()},
    "yuv_to_rgb": lambda: {"yuv": torch.rand(2, 3, 4, 4) * 0.5},
    "project_simplex": lambda: {"v": torch.rand(2, 5)},
    "convex_polytope_loss": lambda: {"poison_features": [torch.rand(3, 4)], "target_features": [torch.rand(4)],
                                     "coefficients": [torch.full((3,), 1 / 3)]},
    # certify
    "hyperplane_distance": lambda: {k: v for k, v in _affine().items() if k in ("slack", "normal_norm")},
    "region_radius": lambda: {k: v for k, v in _affine().items() if k in ("slack", "normal_norm")},
    "local_linear_radius": lambda: {"logits": _affine()["logits"], "weight": _affine()["weight"],
                                    "label": torch.tensor([0, 1])},
    "simplex_radius": lambda: {**_affine(), "label": torch.tensor([0, 1])},
    "lipschitz_radius": lambda: {"logits": _affine()["logits"], "label": torch.tensor([0, 1]),
                                 "margin_lipschitz": _lipschitz()},
    "decision_boundary_radius": lambda: {**_affine(), "label": torch.tensor([0, 1]),
                                         "margin_proj": torch.zeros(2, 3, _affine()["slack"].shape[1],
                                                                    dtype=torch.float64),
                                         "margin_lipschitz": _lipschitz()},
    # ot
    "pairwise_cost": lambda: {"x": _x(3, 2), "y": _x(4, 2)},
    "primal_transport_cost": lambda: {"coupling": torch.full((3, 4), 1 / 12), "cost": torch.rand(3, 4)},
    "entropic_coupling": lambda: {"d_real": torch.rand(3), "d_fake": torch.rand(4), "cost": torch.rand(3, 4),
                                  "reg": 0.5},
    "class_mixture_weights": lambda: {"labels": torch.tensor([0, 1, 1]), "proportions": torch.tensor([0.4, 0.6])},
    "mixture_expectation": lambda: {"component_scores": torch.rand(2, 5), "proportions": torch.tensor([0.4, 0.6])},
    "normalized_wasserstein": lambda: {"target_scores": torch.rand(6), "component_scores": torch.rand(2, 5),
                                       "proportions": torch.tensor([0.4, 0.6])},
    "sample_mixture": lambda: {"component_samples": torch.rand(2, 5, 3), "proportions": torch.tensor([0.4, 0.6])},
    "mixture_recovery_errors": lambda: {"samples": torch.rand(20, 2), "means": torch.tensor([[0.0, 0.0], [1.0, 1.0]]),
                                        "covariances": torch.eye(2).repeat(2, 1, 1),
                                        "proportions": torch.tensor([0.5, 0.5])},
    # interpret
    "gradient_saliency": lambda: {"model": _net(), "x": _x()},
    "hessian_vector_product": lambda: {"model": _net(), "x": _x(), "y": None, "v": _x()},
    "scale_saliency": lambda: {"grad": torch.rand(2, 4)},
    "topk_intersection": lambda: {"a": torch.rand(2, 4), "b": torch.rand(2, 4), "k": 2},
    "topk_mask": lambda: {"saliency": torch.rand(2, 4), "k": 2},
    "topk_saliency_mass": lambda: {"saliency": torch.rand(2, 4), "mask": torch.rand(2, 4) > 0.5},
    "knn_vote_counts": lambda: {"features": torch.rand(20, 4), "labels": torch.arange(20) % 2, "k": 3},
    "caso_solve": lambda: {"grad": torch.rand(2, 4), "hvp": None, "lambda1": 0.1,
                           "lambda2": torch.full((2,), 2.0), "n_iter": 2},
    # metrics
    "certified_accuracy": lambda: {"radius": torch.rand(4), "correct": torch.tensor([True, False, True, True]),
                                   "radii": [0.0, 0.5]},
    "image_quality": lambda: {"real": torch.rand(12, 4), "fake": torch.rand(12, 4), "features": _features_net(),
                              "kid_subsets": 2, "kid_subset_size": 6},
    "CertifiedAccuracy.update": lambda: {"radius": torch.rand(4), "preds": torch.tensor([0, 1, 1, 0]),
                                         "target": torch.tensor([0, 1, 0, 0])},
    "RobustAccuracy.update": lambda: {"model": _net(), "x": _x(), "y": torch.tensor([0, 1]), "x_adv": _x()},
    "TopKIntersection.update": lambda: {"saliency": torch.rand(2, 8), "other": torch.rand(2, 8)},
}

# Public functions that take no floating-point tensor the caller supplies (or none at all), with the reason.
NO_TENSOR_INPUT = {
    "available_nets": "no arguments", "build_net": "a name and constructor arguments",
    "register_net": "a name and a factory", "model_mode": "a module and a mode",
    "attack_loss": "swept: logits", "hoeffding_error": "integers and a confidence",
    "cost_log_normalizer": "a cost name and numbers", "scheduled_reg": "numbers",
    "softplus_surrogate": "a module", "lipschitz_bound": "a module and a shape",
    "clustering_accuracy": "integer labels", "default_k": "integer labels", "plurality_keep": "integer counts",
    "poison_detection_scores": "boolean masks", "load_causal_lm": "a path", "train_causal_lm": "texts",
    "per_word_perplexity": "texts", "evaluate_text_attack": "token-id batches",
    "load_word_lm": "a path", "train_word_lm": "texts", "sliding_windows": "integers",
}
# Public functions with tensor inputs not swept here, with the reason. Those of this library call
# check_finite on their tensors all the same (noted); the sweep needs recipes it does not have for them.
NOT_SWEPT = {
    "sinkhorn": "ot/sinkhorn.py checks cost and marginals itself (tests/ot/test_sinkhorn.py)",
    "sinkhorn_divergence": "ot/sinkhorn.py is rewritten on its own branch, input checks included",
    "nearest_to_target": "needs a feature extractor and candidate images (checks candidates and target)",
    "optimize_perturbations": "needs perturbation components and objectives (checks x; so does Attack.validate)",
    "assign_to_generators": "optimises latent codes of generators (checks x)",
    "entropic_log_likelihood": "needs trained critics (checks y)",
    "estimate_normalized_wasserstein": "trains a critic (checks target and components)",
    "fit_fake_potential": "needs a generator (checks data)",
    "as_attack": "takes an attack object, no tensor (tests/attacks/test_foreign.py)",
    "check_adversarial_output": "a NaN x_adv is its ForeignAttackError naming the attack (tests/attacks/"
                                "test_foreign.py); a NaN clean x is refused by check_finite('x')",
}
# (function, argument) pairs where +inf is a valid value: only NaN and -inf must be refused.
POSINF_OK = {("hyperplane_distance", "slack"), ("region_radius", "slack"), ("simplex_radius", "slack"),
             ("decision_boundary_radius", "slack"), ("certified_accuracy", "radius"),
             ("CertifiedAccuracy.update", "radius"), ("lipschitz_radius", "margin_lipschitz"),
             ("decision_boundary_radius", "margin_lipschitz")}

METRIC_CLASSES = {"CertifiedAccuracy.update": CertifiedAccuracy, "RobustAccuracy.update": RobustAccuracy,
                  "TopKIntersection.update": TopKIntersection}


def _public_functions() -> dict[str, Callable[..., Any]]:
    out: dict[str, Callable[..., Any]] = {}
    for pkg in PACKAGES:
        mod = importlib.import_module(f"lightning_robust.{pkg}")
        for name in mod.__all__:
            if inspect.isfunction(getattr(mod, name)):
                out[name] = getattr(mod, name)
    return out


FUNCTIONS = _public_functions()
CASES = sorted((set(FUNCTIONS) - set(NO_TENSOR_INPUT) - set(NOT_SWEPT)) | set(METRIC_CLASSES))


def _recipe(name: str) -> dict[str, Any]:
    return (EXTRA.get(name) or RECIPES[name])()


def _call(name: str, kwargs: dict[str, Any]) -> None:
    if name in METRIC_CLASSES:
        METRIC_CLASSES[name]().update(**kwargs)
        return
    result = FUNCTIONS[name](**kwargs)
    if hasattr(result, "__enter__"):
        with result:
            pass


def _poisoned(value: Any, bad: float) -> Any:
    """A copy of a floating tensor (or of the first one of a sequence) with its first entry set to ``bad``."""
    if torch.is_tensor(value):
        out = value.detach().clone()
        out.view(-1)[0] = bad
        return out
    out_list = list(value)
    out_list[0] = _poisoned(out_list[0], bad)
    return out_list


def _float_tensor_args(kwargs: dict[str, Any]) -> list[str]:
    def is_float(v: Any) -> bool:
        return torch.is_tensor(v) and v.is_floating_point() and v.numel() > 0
    return [k for k, v in kwargs.items()
            if is_float(v) or (isinstance(v, (list, tuple)) and v and all(is_float(t) for t in v))]


def test_every_public_function_is_swept_or_has_a_reason():
    names = set(FUNCTIONS)
    assert set(NO_TENSOR_INPUT) <= names and set(NOT_SWEPT) <= names, "stale entries"
    missing = [n for n in CASES if n not in EXTRA and n not in RECIPES]
    assert not missing, f"no recipe: {missing}"
    for name in CASES:
        assert _float_tensor_args(_recipe(name)), f"{name}: the recipe has no floating-point tensor"


@pytest.mark.parametrize("name", CASES)
def test_nonfinite_tensor_arguments_are_refused_by_name(name):
    _call(name, _recipe(name))  # the valid call works
    for arg in _float_tensor_args(_recipe(name)):
        bads = [float("nan"), -float("inf")] + ([] if (name, arg) in POSINF_OK else [float("inf")])
        for bad in bads:
            kwargs = _recipe(name)
            kwargs[arg] = _poisoned(kwargs[arg], bad)
            with pytest.raises(ValueError, match=re.escape(arg)):
                _call(name, kwargs)
