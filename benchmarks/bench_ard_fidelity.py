"""Fidelity of Adversarially Robust Distillation (Goldblum et al., arXiv 1905.09747) at CPU scale.

The paper's claims: (1) a student distilled on clean images (KD) inherits some of a robust teacher's
robustness but far from all of it; (2) ARD's student is much more robust than the KD student and at least as
robust as an adversarially trained (AT) student of the same architecture; (3) fast ARD (free training with
``m`` replays, or FGSM with a random start) gets close to ARD at a fraction of the cost.

Setting: the bundled 8x8 digits (first 1437 for training, the held-out 360 for test; 17 grey levels, so
L-inf eps = 0.1). Teacher: SmallCNN adversarially trained with PGD-7 (step eps/4). Students: a small MLP
(64-64-10) trained with the same number of epochs, Adam 2e-3, as (a) natural cross-entropy, (b) Madry AT with
PGD-10 (step eps/4), and for temperatures 30 (the paper's CIFAR-10 value) and 1: (c) KD
(``ARDStudent(adversarial_mode="clean")``), (d) ARD with the same PGD-10, (e) free ARD, m = 4 (a quarter of the
epochs), (f) fast ARD, FGSM with random start; alpha 1 as in the paper. Evaluation: clean and PGD-20 accuracy
(step eps/4, random start) on the test split, mean and spread over seeds. Training time is relative to KD.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.common import markdown_table
from lightning_robust.attacks import PGD
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.models import ARDStudent, Classifier
from lightning_robust.nets import MLP, SmallCNN

EPS = 0.1
TEMPERATURES = (30, 1)  # the paper's CIFAR-10 temperature, and plain softmax matching


def _student() -> nn.Module:
    return MLP(in_features=64, num_classes=10, hidden=(64,))


def _fit(model: pl.LightningModule, epochs: int) -> float:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, val_fraction=0.0, seed=0))
    return time.perf_counter() - t0


def _train_attack() -> PGD:
    return PGD(eps=EPS, alpha=EPS / 4, steps=10, random_start=True)


def _student_model(kind: str, teacher: nn.Module, seed: int) -> tuple[pl.LightningModule, float]:
    """``kind`` is ``natural``, ``at`` or ``<kd|ard|free|fast>@<temperature>``."""
    pl.seed_everything(seed, verbose=False)
    adam = partial(torch.optim.Adam, lr=2e-3)
    if kind == "natural":
        return Classifier(_student(), optimizer=adam), 1.0
    if kind == "at":
        return Classifier(_student(), optimizer=adam, attack=_train_attack()), 1.0
    method, temperature = kind.split("@")
    mode = {"kd": "clean", "ard": "pgd", "free": "free", "fast": "fast"}[method]
    model = ARDStudent(_student(), teacher, attack=_train_attack(), temperature=float(temperature), alpha=1.0,
                       adversarial_mode=mode, free_replays=4, optimizer=adam, seed=seed)
    return model, 0.25 if method == "free" else 1.0


def _accuracies(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    net.eval()
    pgd20 = PGD(eps=EPS, alpha=EPS / 4, steps=20, random_start=True)
    x_adv = pgd20(net, x, y, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean()), float((net(x_adv).argmax(1) == y).float().mean())


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def run(quick: bool = False) -> str:
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    teacher_epochs, epochs, seeds = (6, 4, [0]) if quick else (20, 20, [0, 1, 2])
    dm = DigitsDataModule(batch_size=64, val_fraction=0.0, seed=0)
    dm.setup()
    x, y = next(iter(DataLoader(dm.test_dataset, batch_size=10_000)))  # type: ignore[arg-type]

    pl.seed_everything(0, verbose=False)
    teacher_model = Classifier(SmallCNN(input_size=8), optimizer=partial(torch.optim.Adam, lr=2e-3),
                               attack=PGD(eps=EPS, alpha=EPS / 4, steps=7, random_start=True))
    teacher_time = _fit(teacher_model, teacher_epochs)
    teacher = teacher_model.net.eval()
    t_clean, t_robust = _accuracies(teacher, x, y)
    rows: list[list[Any]] = [[f"teacher: SmallCNN, PGD-7 AT ({teacher_epochs} epochs)",
                              sum(p.numel() for p in teacher.parameters()), f"{t_clean:.3f}", f"{t_robust:.3f}", "-"]]
    names = {"natural": "student: natural training", "at": "student: AT, PGD-10 (Madry)"}
    for temperature in TEMPERATURES:
        names.update({f"kd@{temperature}": f"student: KD (clean distillation), T = {temperature}",
                      f"ard@{temperature}": f"student: ARD, PGD-10, T = {temperature}",
                      f"free@{temperature}": f"student: fast ARD, free m = 4 (1/4 of the epochs), T = {temperature}",
                      f"fast@{temperature}": f"student: fast ARD, FGSM + random start, T = {temperature}"})
    times: dict[str, list[float]] = {}
    results: dict[str, tuple[list[float], list[float]]] = {}
    for kind in names:
        clean, robust, secs = [], [], []
        for seed in seeds:
            model, epoch_fraction = _student_model(kind, teacher, seed)
            secs.append(_fit(model, max(1, math.ceil(epochs * epoch_fraction))))
            c, r = _accuracies(model.net, x, y)  # type: ignore[arg-type]
            clean.append(c)
            robust.append(r)
        times[kind], results[kind] = secs, (clean, robust)
    kd_time = statistics.mean(times[f"kd@{TEMPERATURES[0]}"])
    n_student = sum(p.numel() for p in _student().parameters())
    for kind, name in names.items():
        clean, robust = results[kind]
        rows.append([name, n_student, _fmt(clean), _fmt(robust), f"{statistics.mean(times[kind]) / kd_time:.2f}"])
    at = statistics.mean(results["at"][1])
    verdict = ""
    for temperature in TEMPERATURES:
        ard, kd = (statistics.mean(results[f"{k}@{temperature}"][1]) for k in ("ard", "kd"))
        verdict += (f"T = {temperature}: ARD student PGD-20 accuracy {ard:.3f} vs KD {kd:.3f} (difference "
                    f"{ard - kd:+.3f}) and vs AT {at:.3f} (difference {ard - at:+.3f}).\n")
    return (
        f"### ARD on the digits (L-inf eps = {EPS}; students {epochs} epochs, {len(seeds)} seed(s); "
        f"{len(y)} test digits; teacher trained in {teacher_time:.0f} s)\n\n"
        + markdown_table(["model", "parameters", "clean acc", "PGD-20 acc", "train time / KD"], rows)
        + f"\n\n{verdict}"
    )


if __name__ == "__main__":
    print(run(quick=True))
