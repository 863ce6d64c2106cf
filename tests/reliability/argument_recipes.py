"""Values for the required arguments of every public class, so the argument sweep can build each one.

A class whose required arguments have no recipe here is reported by the sweep as not covered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def required_value(name: str, cls_name: str, tmp: str) -> Any:
    from lightning_robust.attacks import PGD
    from lightning_robust.datamodules import ColoredDigitsDataModule, DigitsDataModule
    from lightning_robust.nets import MLP, DCGANGenerator, DualCritic, LinearGenerator, MLPGenerator

    digits_net = MLP(64, 10, hidden=(8,))
    table: dict[str, Any] = {
        "net": digits_net,
        "student": MLP(64, 10, hidden=(8,)),
        "teacher": MLP(64, 10, hidden=(8,)),
        "model": digits_net,
        "classifier": digits_net,
        "feature_extractor": nn.Sequential(nn.Flatten(), nn.Linear(64, 8)),
        "head": MLP(8, 3, hidden=(4,)),
        "critic": MLP(8, 1, hidden=(4,)),
        "discriminator": MLP(2, 1, hidden=(8,)),
        "critics": DualCritic(MLP(2, 1, (4,)), MLP(2, 1, (4,))),
        "teacher_generator": DCGANGenerator(8, 1, 8, d=2),
        "student_generator": DCGANGenerator(8, 1, 8, d=1),
        "attack": PGD(eps=0.1),
        "attacks": {"pgd": PGD(eps=0.1)},
        "datamodule": DigitsDataModule(),
        "source": ColoredDigitsDataModule(colored=False, half=0),
        "target": ColoredDigitsDataModule(colored=True, half=1),
        "threat": None,
        "num_classes": 10,
        "num_features": 8,
        "root": tmp,
        "data_dir": tmp,
        "path": tmp,
        "output_dir": tmp,
    }
    if name == "generator":
        return LinearGenerator(hidden=()) if cls_name == "NWGAN" else MLPGenerator(latent_dim=2)
    if name == "threat":
        from lightning_robust.attacks import ThreatModel

        return ThreatModel("linf", 0.1)
    if name in table:
        return table[name]
    raise KeyError(name)


def tensor_of(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape)
