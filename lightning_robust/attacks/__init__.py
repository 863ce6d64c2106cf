"""Adversarial attacks (pure PyTorch). Every attack follows the :class:`Attack` contract."""

from lightning_robust.attacks.base import Attack, attack_loss, model_mode
from lightning_robust.attacks.pgd import FGSM, PGD
from lightning_robust.attacks.spgd import SPGD, EmbeddingPGD
from lightning_robust.attacks.text import TextAttack, TextAttackResult
from lightning_robust.attacks.threat import ThreatModel

__all__ = [
    "Attack",
    "EmbeddingPGD",
    "FGSM",
    "PGD",
    "SPGD",
    "TextAttack",
    "TextAttackResult",
    "ThreatModel",
    "attack_loss",
    "model_mode",
]
