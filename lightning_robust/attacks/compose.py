"""Composition of threat models (Laidlaw & Feizi 2019, arXiv 1906.00001, Section 4).

``Compose([ReColorAdv(), StAdv(), PGD(eps=8/255)])`` is the paper's strongest attack, "ReColorAdv + StAdv
+ delta": the image is recoloured, then spatially warped, then an L-inf delta is added,
``x' = clip(warp(recolor(x; θ_1); θ_2) + δ)``, and all parameters are optimized jointly by Adam against the
Carlini-Wagner margin minus each component's weighted smoothness penalty (the delta has none), each
projected onto its own feasible set after every step. The paper proves such combinations reach points
that neither constituent threat model allows, and finds them stronger than each alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lightning_robust.attacks.base import Attack
from lightning_robust.attacks.functional_base import FunctionalAttack, Perturbation

__all__ = ["Compose"]


class Compose(FunctionalAttack):
    """Chain several perturbations into one threat model and optimize them jointly.

    The components' own optimizer settings (``steps``, ``lr``, ...) are ignored: Compose's are used;
    their budgets, colour spaces and smoothness weights apply. :class:`~lightning_robust.attacks.PGD`
    (and FGSM) act as the additive "delta" component.

    Args:
        attacks: the components in the order they are applied (any :class:`Perturbation`: ReColorAdv,
            StAdv, PGD).
        steps, lr, optimizer, random_start: the joint optimizer (paper: 100 Adam steps, lr 0.001).
        loss: ``"cw"`` (paper) or ``"ce"``.
        keep_best: ``"regularized"`` (authors' code) or ``"success"``; see
            :class:`~lightning_robust.attacks.FunctionalAttack`.
        targeted, model_mode, kappa, low, high: as in :class:`~lightning_robust.attacks.Attack`.

    Raises:
        ValueError: if ``attacks`` is empty or holds something that is not a :class:`Perturbation`.

    Example:
        >>> attack = Compose([ReColorAdv(), StAdv(), PGD(eps=8 / 255)])
        >>> x_adv = attack(model, x, y)
    """

    def __init__(
        self,
        attacks: Sequence[Perturbation],
        steps: int = 100,
        lr: float = 0.001,
        optimizer: str = "adam",
        random_start: bool = False,
        loss: str = "cw",
        targeted: bool = False,
        model_mode: str = "eval",
        kappa: float = float("inf"),
        low: float = 0.0,
        high: float = 1.0,
        keep_best: str = "regularized",
    ) -> None:
        super().__init__(steps=steps, lr=lr, optimizer=optimizer, random_start=random_start, loss=loss,
                         targeted=targeted, model_mode=model_mode, kappa=kappa, low=low, high=high,
                         keep_best=keep_best)
        attacks = list(attacks)
        if not attacks:
            raise ValueError("attacks must hold at least one perturbation, got an empty list")
        bad = [type(a).__name__ for a in attacks if not isinstance(a, Perturbation)]
        if bad:
            raise ValueError(f"attacks must be perturbations (ReColorAdv, StAdv, PGD, ...), got {bad}")
        self.attacks = attacks

    def __repr__(self) -> str:
        inner = " + ".join(repr(a) for a in self.attacks)
        return f"Compose([{inner}], steps={self.steps}, lr={self.lr}, optimizer={self.optimizer!r})"

    @property
    def eps(self) -> float:
        return max(float(getattr(a, "eps", 0.0)) for a in self.attacks)

    def components(self) -> list[Perturbation]:
        return list(self.attacks)

    def validate(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().validate(x, y)
        for a in self.attacks:
            if isinstance(a, Attack):
                a.validate(x, y)
