"""Adversarial attacks (pure PyTorch). Every attack follows the :class:`Attack` contract."""

from lightning_robust.attacks.base import Attack, attack_loss, model_mode
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
)
from lightning_robust.attacks.spgd import SPGD, EmbeddingPGD
from lightning_robust.attacks.text import TextAttack, TextAttackResult
from lightning_robust.attacks.threat import ThreatModel

__all__ = [
    "Attack",
    "ConvexPolytope",
    "EmbeddingPGD",
    "FGSM",
    "FeatureCollision",
    "LayerFeatures",
    "PGD",
    "PoisonAttack",
    "SPGD",
    "TextAttack",
    "TextAttackResult",
    "ThreatModel",
    "attack_loss",
    "convex_polytope_loss",
    "model_mode",
    "nearest_to_target",
    "project_simplex",
    "simplex_least_squares",
]
