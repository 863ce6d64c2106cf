"""Overhead of the Trainer over a minimal hand-written PyTorch loop doing the same work (issue 25, item 4).

Every LightningModule of the package is trained twice on the same batches from the same initial weights:
by ``Trainer.fit`` and by its plain-loop twin (:mod:`benchmarks.loop_twins`), which performs the same
optimizer steps by calling the module's pieces (nets, optimizers, objectives and loss methods, keyed noise)
without the Trainer, the logging or the metrics; ``tests/test_benchmarks_loop_twins.py`` checks that both
leave the same parameters. Workloads are CPU-sized versions of each paper's: SmallCNN on the bundled digits
at 28x28 for the supervised modules, DCGAN-style nets on the digits at 32x32 for the GANs, the authors'
digits feature net for NW domain adaptation (target: the digits with inverted contrast), an LSTM text
classifier (Miyato et al.'s, the SPGD paper's) on random token sequences with SPGD adversarial training.
The fit length is set from a timed epoch of the twin so that each fit takes about ``target`` CPU seconds (30 s
by default: start-up must not dominate), and the two loops alternate, so a load change on the shared
machine hits both alike. Times are process CPU seconds with one torch thread (the Trainer's overhead is CPU
work; CPU time leaves out the time the machine gives to other jobs); the wall-time ratio is reported beside.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import markdown_table, matmul_gflops
from benchmarks.loop_twins import plain_fit
from lightning_robust.attacks import PGD, SPGD
from lightning_robust.datamodules import load_digits_tensors
from lightning_robust.models import (
    GAN,
    NWGAN,
    ARDStudent,
    Classifier,
    DistilledGAN,
    EntropicGAN,
    InterpretationRegularizedClassifier,
    NWDomainAdaptation,
    TextClassifier,
)
from lightning_robust.nets import (
    MLP,
    DCGANDiscriminator,
    DCGANGenerator,
    DigitFeatureExtractor,
    DualCritic,
    SmallCNN,
    WordVectorClassifier,
)


@dataclass
class Case:
    """A module builder (fresh module, same initial weights on every call) and its training batches."""

    build: Callable[[], pl.LightningModule]
    loader: DataLoader


def _adam() -> partial[torch.optim.Optimizer]:
    return partial(torch.optim.Adam, lr=1e-3)


def _pgd() -> PGD:
    return PGD(eps=0.1, alpha=0.04, steps=3)


def _seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make()


def _collate_paired(items: list[tuple[torch.Tensor, ...]]) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                                  tuple[torch.Tensor, torch.Tensor]]:
    """``(source, target)`` batches from ``(x_s, y_s, x_t, y_t)`` rows (NWDomainAdaptation's tuple format)."""
    x_s, y_s, x_t, y_t = (torch.stack([it[i] for it in items]) for i in range(4))
    return (x_s, y_s), (x_t, y_t)


def _tokens(n: int, length: int, vocab: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randint(2, vocab, (n, length), generator=g), torch.randint(0, 2, (n,), generator=g))


def cases(n: int | None = None, batch: int = 64, text_n: int = 512, tiny: bool = False) -> dict[str, Case]:
    """The benchmark's modules; ``n`` caps the digits used (``None``: all 1,797).

    ``tiny`` shrinks every net and input (8x8 supervised digits, 16x16 GAN digits, narrow nets, short texts) for
    the twins' equality test, which needs the same modules, not the same sizes.
    """
    side, gan_side, da_side = (8, 16, 16) if tiny else (28, 32, 28)
    w = 4 if tiny else 16  # DCGAN width factor d
    length, vocab, hidden = (12, 300, 16) if tiny else (64, 5000, 64)
    x, y = load_digits_tensors(side, 1)
    x_gan, _ = load_digits_tensors(gan_side, 1)
    x_da, _ = load_digits_tensors(da_side, 1)
    n = len(y) if n is None else n
    x, x_gan, x_da, y = x[:n], x_gan[:n], x_da[:n], y[:n]
    digits = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)
    digits_gan = DataLoader(TensorDataset(x_gan, y), batch_size=batch, shuffle=False)
    # Target domain: the same digits with inverted contrast, in another order (unpaired with the source).
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    paired = DataLoader(TensorDataset(x_da, y, 1 - x_da[perm], y[perm]), batch_size=batch, shuffle=False,
                        collate_fn=_collate_paired)
    text = DataLoader(_tokens(text_n, length, vocab), batch_size=max(1, batch // 2), shuffle=False)

    cnn = _seeded(lambda: SmallCNN(input_size=side))
    teacher = copy.deepcopy(cnn).eval()
    gen = _seeded(lambda: DCGANGenerator(image_size=gan_side, channels=1, latent_dim=64, d=w))
    critic = _seeded(lambda: DCGANDiscriminator(image_size=gan_side, channels=1, d=w), 1)
    big_gen = _seeded(lambda: DCGANGenerator(image_size=gan_side, channels=1, latent_dim=64, d=2 * w), 2)
    small_gen = _seeded(lambda: DCGANGenerator(image_size=gan_side, channels=1, latent_dim=64, d=w // 2), 3)
    features = _seeded(lambda: DigitFeatureExtractor(in_channels=1, image_size=da_side), 4)
    width = int(features.out_features)  # type: ignore[arg-type]
    heads = _seeded(lambda: nn.ModuleList([nn.Linear(width, 10), MLP(width, 1, (4 * w, 4 * w))]), 5)
    lstm = _seeded(lambda: WordVectorClassifier(vocab_size=vocab, embedding_dim=50, hidden_size=hidden), 6)

    def c(m: nn.Module) -> nn.Module:
        return copy.deepcopy(m)

    return {
        "Classifier (clean)": Case(lambda: Classifier(c(cnn), optimizer=_adam()), digits),
        "Classifier (PGD-3 adversarial training)": Case(
            lambda: Classifier(c(cnn), optimizer=_adam(), attack=_pgd()), digits),
        "ARDStudent (PGD-3)": Case(lambda: ARDStudent(c(cnn), teacher, attack=_pgd(), optimizer=_adam()), digits),
        "InterpretationRegularizedClassifier (PGD-3)": Case(lambda: InterpretationRegularizedClassifier(
            c(cnn), attack=_pgd(), perturbation="attack", optimizer=_adam()), digits),
        "GAN (DCGAN, WGAN-GP, n_critic 5)": Case(lambda: GAN(c(gen), c(critic), loss="wgan-gp"), digits_gan),
        "NWGAN (3 DCGAN components, WGAN-GP)": Case(
            lambda: NWGAN(c(gen), c(critic), num_components=3, loss="wgan-gp"), digits_gan),
        "EntropicGAN (DCGAN, l2 cost)": Case(
            lambda: EntropicGAN(c(gen), DualCritic(c(critic), c(critic)), cost="l2"), digits_gan),
        "DistilledGAN (joint, DCGAN 2d -> d/2)": Case(
            lambda: DistilledGAN(c(big_gen).eval(), c(small_gen), c(critic), mode="joint", loss="wgan-gp"),
            digits_gan),
        "NWDomainAdaptation (digits -> inverted digits)": Case(
            lambda: NWDomainAdaptation(c(features), c(heads[0]), c(heads[1]), method="nw"), paired),
        "TextClassifier (LSTM, SPGD-3 adversarial training)": Case(
            lambda: TextClassifier(c(lstm), attack=SPGD(max_words=3, steps=3), optimizer=_adam()), text),
    }


def _plain(model: pl.LightningModule, loader: DataLoader, epochs: int) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of the twin's fit."""
    t0, c0 = time.perf_counter(), time.process_time()
    plain_fit(model, loader, epochs)
    return time.perf_counter() - t0, time.process_time() - c0


def _lightning(model: pl.LightningModule, loader: DataLoader, epochs: int) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of ``Trainer.fit``, Trainer construction included."""
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, train_dataloaders=loader)
    return time.perf_counter() - t0, time.process_time() - c0


def run(quick: bool = False, target: float | None = None, only: list[str] | None = None,
        repeat: int | None = None) -> str:
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    target = target if target is not None else (1.0 if quick else 30.0)
    n = 256 if quick else None
    # One alternating pair per module at 30 CPU-s fits: ten modules take ~12 CPU-minutes on this machine.
    repeat = repeat if repeat is not None else 1
    rows = []
    for name, case in cases(n, text_n=64 if quick else 512).items():
        if only is not None and not any(o in name for o in only):
            continue
        epoch = _plain(case.build(), case.loader, 1)[1]
        epochs = max(1, math.ceil(target / epoch))
        plain, light = [], []
        for _ in range(repeat):  # alternating, so load changes hit both loops alike
            plain.append(_plain(case.build(), case.loader, epochs))
            light.append(_lightning(case.build(), case.loader, epochs))
        (w_plain, c_plain), (w_light, c_light) = min(plain, key=lambda t: t[1]), min(light, key=lambda t: t[1])
        rows.append([name, len(case.loader), epochs, c_plain, c_light, c_light / c_plain, w_light / w_plain])
        print(rows[-1], flush=True)
    gflops = matmul_gflops(512 if quick else 1024)
    return (
        f"### Training-loop overhead (fits of ~{target:g} CPU s, "
        + ("one twin-then-Trainer pair per module" if repeat == 1 else f"best of {repeat} alternating runs")
        + ")\n\n"
        + markdown_table(["module", "batches per epoch", "epochs per fit", "plain-loop twin (CPU s)",
                          "Trainer.fit (CPU s)", "CPU-time ratio (target <= 1.05)", "wall-time ratio"], rows)
        + f"\n\nThis machine's float32 matmul rate: {gflops:.1f} GFLOP/s. Batches of 64 digits (SmallCNN at 28x28; "
        "DCGAN generators and critic of width d = 16 at 32x32, the distilled teacher 32 and student 8; the digits "
        "feature net at 28x28 with an MLP(768, 64, 64) critic) and of 32 token sequences of length 64 (LSTM, hidden "
        "64, 5,000 words). One torch thread; the ratio is of process CPU time (what the Trainer adds is CPU work, "
        "and CPU time does not count the time the shared machine gives to other jobs), the wall-time ratio beside "
        "it. Measured on a 2-core machine shared with other engineers' jobs; the two loops alternate."
    )
