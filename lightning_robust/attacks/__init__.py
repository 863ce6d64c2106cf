"""Adversarial attacks (pure PyTorch). Every attack follows the :class:`Attack` contract.

* L-p attacks: :class:`PGD` (L-inf / L2, random start, restarts), :class:`FGSM` (with the random start of
  fast adversarial training).
* Functional attacks (arXiv 1906.00001): :class:`ReColorAdv` (a smooth colour function), :class:`StAdv`
  (a smooth flow field) and :class:`Compose` to chain them with each other and with an additive delta.
"""

from lightning_robust.attacks.base import Attack, attack_loss, model_mode
from lightning_robust.attacks.color_spaces import cieluv_to_rgb, rgb_to_cieluv, rgb_to_yuv, yuv_to_rgb
from lightning_robust.attacks.compose import Compose
from lightning_robust.attacks.functional import FunctionalAttack, Perturbation, optimize_perturbations
from lightning_robust.attacks.pgd import FGSM, PGD
from lightning_robust.attacks.recoloradv import ReColorAdv
from lightning_robust.attacks.stadv import StAdv
from lightning_robust.attacks.threat import ThreatModel

__all__ = [
    "Attack",
    "Compose",
    "FGSM",
    "FunctionalAttack",
    "PGD",
    "Perturbation",
    "ReColorAdv",
    "StAdv",
    "ThreatModel",
    "attack_loss",
    "cieluv_to_rgb",
    "model_mode",
    "optimize_perturbations",
    "rgb_to_cieluv",
    "rgb_to_yuv",
    "yuv_to_rgb",
]
