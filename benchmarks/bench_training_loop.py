"""Overhead of the Trainer over a minimal hand-written PyTorch loop doing the same work (issue 25, item 4).

For each supervised LightningModule (Classifier clean and with PGD adversarial training, ARDStudent,
InterpretationRegularizedClassifier) both loops train the same SmallCNN (same initial weights, same
batches, the module's own optimizer) on the bundled digits upsampled to 28x28: the plain loop calls the
module's ``training_loss(x, y)`` (the whole objective: attack, distillation, saliency penalty), then
``backward`` and ``step``; the Trainer side adds what a user's fit adds (Trainer construction, the
``training_step`` logging and the torchmetrics accuracy). The fit length is set from a timed epoch of
the plain loop so that each fit lasts about ``target`` seconds (30 s by default: start-up must not
dominate), and the two loops alternate, so a load change on the shared machine hits both alike.

The GANs and NWDomainAdaptation use manual optimization (their steps call ``self.optimizers()``), so a
plain loop would re-implement their training step rather than measure the Trainer; they are timed on a
GPU by ``benchmarks/gpu.py`` and not here.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from functools import partial

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import markdown_table, matmul_gflops
from lightning_robust.attacks import PGD
from lightning_robust.datamodules import load_digits_tensors
from lightning_robust.models import ARDStudent, Classifier, InterpretationRegularizedClassifier
from lightning_robust.nets import SmallCNN


def _adam() -> partial[torch.optim.Optimizer]:
    return partial(torch.optim.Adam, lr=1e-3)


def _pgd() -> PGD:
    return PGD(eps=0.1, alpha=0.04, steps=3)


def _builders(base: torch.nn.Module) -> dict[str, Callable[[], pl.LightningModule]]:
    teacher = copy.deepcopy(base).eval()
    return {
        "Classifier (clean)": lambda: Classifier(copy.deepcopy(base), optimizer=_adam()),
        "Classifier (PGD-3 adversarial training)": lambda: Classifier(copy.deepcopy(base), optimizer=_adam(),
                                                                      attack=_pgd()),
        "ARDStudent (PGD-3)": lambda: ARDStudent(copy.deepcopy(base), teacher, attack=_pgd(), optimizer=_adam()),
        "InterpretationRegularizedClassifier (PGD-3)": lambda: InterpretationRegularizedClassifier(
            copy.deepcopy(base), attack=_pgd(), perturbation="attack", optimizer=_adam()),
    }


def _plain(model: pl.LightningModule, loader: DataLoader, epochs: int) -> float:
    opt = model.configure_optimizers()
    assert isinstance(opt, torch.optim.Optimizer)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = model.training_loss(x, y)[0]  # type: ignore[operator]
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def _lightning(model: pl.LightningModule, loader: DataLoader, epochs: int) -> float:
    t0 = time.perf_counter()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=loader)
    return time.perf_counter() - t0


def run(quick: bool = False, target: float | None = None) -> str:
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    target = target if target is not None else (1.0 if quick else 30.0)
    x, y = load_digits_tensors(28, 1)
    n = 256 if quick else len(y)
    loader = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=64, shuffle=False)
    torch.manual_seed(0)
    base = SmallCNN(input_size=28)
    repeat = 1 if quick else 2
    rows = []
    for name, build in _builders(base).items():
        epoch = _plain(build(), loader, 1)
        epochs = max(1, math.ceil(target / epoch))
        plain, light = [], []
        for _ in range(repeat):  # alternating, so load changes hit both loops alike
            plain.append(_plain(build(), loader, epochs))
            light.append(_lightning(build(), loader, epochs))
        t_plain, t_light = min(plain), min(light)
        rows.append([name, epochs, t_plain, t_light, t_light / t_plain])
    gflops = matmul_gflops(512 if quick else 1024)
    return (
        f"### Training-loop overhead (SmallCNN, {n} digits at 28x28, batch 64, fits of ~{target:g} s, "
        f"best of {repeat} alternating runs)\n\n"
        + markdown_table(["module", "epochs per fit", "plain loop (s)", "Trainer.fit (s)",
                          "ratio (target <= 1.05)"], rows)
        + f"\n\nThis machine's float32 matmul rate: {gflops:.1f} GFLOP/s. Measured on a 2-core machine shared "
        "with other engineers' jobs; the ratio compares alternating runs of the same work."
    )
