"""Adversarial attacks (pure PyTorch). Every attack follows the :class:`Attack` contract."""

from lightning_robust.attacks.autoattack import AUTOATTACK_INSTALL, AutoAttack
from lightning_robust.attacks.base import Attack, attack_loss, model_mode
from lightning_robust.attacks.color_spaces import cieluv_to_rgb, rgb_to_cieluv, rgb_to_yuv, yuv_to_rgb
from lightning_robust.attacks.compose import Compose
from lightning_robust.attacks.foreign import ForeignAttack, ForeignAttackError, as_attack, check_adversarial_output
from lightning_robust.attacks.functional_base import FunctionalAttack, Perturbation, optimize_perturbations
from lightning_robust.attacks.pgd import FGSM, PGD
from lightning_robust.attacks.poisons import (
    ConvexPolytope,
    FeatureCollision,
    LayerFeatures,
    PoisonAttack,
    convex_polytope_loss,
    nearest_to_target,
    project_simplex,
    simplex_least_squares,
    simplex_projected_gradient,
)
from lightning_robust.attacks.recoloradv import ReColorAdv
from lightning_robust.attacks.spgd import SPGD, AdvTText, EmbeddingPGD, IAdvTText
from lightning_robust.attacks.stadv import StAdv
from lightning_robust.attacks.text import TextAttack, TextAttackResult
from lightning_robust.attacks.threat import ThreatModel

__all__ = [
    "AUTOATTACK_INSTALL",
    "AdvTText",
    "Attack",
    "AutoAttack",
    "Compose",
    "ConvexPolytope",
    "EmbeddingPGD",
    "FGSM",
    "FeatureCollision",
    "ForeignAttack",
    "ForeignAttackError",
    "FunctionalAttack",
    "IAdvTText",
    "LayerFeatures",
    "PGD",
    "Perturbation",
    "PoisonAttack",
    "ReColorAdv",
    "SPGD",
    "StAdv",
    "TextAttack",
    "TextAttackResult",
    "ThreatModel",
    "as_attack",
    "attack_loss",
    "check_adversarial_output",
    "cieluv_to_rgb",
    "convex_polytope_loss",
    "model_mode",
    "nearest_to_target",
    "optimize_perturbations",
    "project_simplex",
    "rgb_to_cieluv",
    "rgb_to_yuv",
    "simplex_least_squares",
    "simplex_projected_gradient",
    "yuv_to_rgb",
]
