"""Overhead of our Lightning Classifier over a minimal hand-written PyTorch loop doing the same work.

Both train the same SmallCNN (same initial weights, same batches, Adam) for three epochs on the bundled
digits upsampled to 28x28; the ratio is Lightning fit time / plain loop time, measured in one run. The
Lightning side includes Trainer construction, logging and the torchmetrics accuracy update per step.
"""

from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import markdown_table, matmul_gflops, timeit
from lightning_robust.datamodules import load_digits_tensors
from lightning_robust.models import Classifier
from lightning_robust.nets import SmallCNN

EPOCHS = 3  # several epochs per fit, so Trainer construction is amortised as in real use


def _plain_epoch(net: torch.nn.Module, loader: DataLoader) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(EPOCHS):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()


def _lightning_epoch(net: torch.nn.Module, loader: DataLoader) -> None:
    model = Classifier(net)
    trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=loader)


def run(quick: bool = False) -> str:
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    x, y = load_digits_tensors(28, 1)
    n = 512 if quick else len(y)
    loader = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=64, shuffle=False)
    torch.manual_seed(0)
    base = SmallCNN(input_size=28)
    repeat = 2 if quick else 5
    t_plain = timeit(lambda: _plain_epoch(copy.deepcopy(base), loader), repeat=repeat)
    t_pl = timeit(lambda: _lightning_epoch(copy.deepcopy(base), loader), repeat=repeat)
    gflops = matmul_gflops(512 if quick else 1024)
    rows = [["plain PyTorch loop", t_plain, 1.0], ["lightning_robust Classifier + Trainer", t_pl, t_pl / t_plain]]
    return (
        f"### Training-loop overhead (SmallCNN, {n} digits at 28x28, batch 64, {EPOCHS} epochs per fit)\n\n"
        + markdown_table(["loop", "fit seconds (median)", "ratio to plain loop"], rows)
        + f"\n\nThis machine's float32 matmul rate: {gflops:.1f} GFLOP/s."
    )
