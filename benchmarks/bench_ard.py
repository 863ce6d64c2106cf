"""Speed of ARD (arXiv 1905.09747) and fast ARD, as ratios measured side by side in one run.

1. One ARD training step (teacher forward on clean x, PGD-k on the student, student forward + backward,
   optimizer step) against one plain KD step (the same without the attack). The paper's cost model is
   ``k + 1`` student forward-backward passes against one; the teacher's forward is paid by both, so the
   refined expectation is ``(t_T + (k + 1) t_S) / (t_T + t_S)`` with ``t_T`` the teacher forward and ``t_S``
   a student forward-backward, both timed here.
2. One training epoch of fast ARD (free, m replays; FGSM with random start) against one epoch of ARD, and
   the same for whole schedules (free training runs 1/m of the epochs).
3. ``ARDStudent`` trained by ``pl.Trainer`` against a minimal hand-written PyTorch loop doing the same work
   (same nets, data order, attack and loss), per epoch after a warm-up epoch; the loop's epochs run between
   the Lightning epochs (from a callback), so that both see the same load on a busy machine.

CPU, digits 8x8 (1437 training images, batch 128), student SmallCNN (width 1), teacher SmallCNN (width 2; the
step ratio also with a width-1 teacher, the student's own size). A PGD step's backward computes the input
gradient only (no weight gradients), so it costs less than a training step's forward-backward.
"""

from __future__ import annotations

import logging
import statistics
import time
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import markdown_table, timeit
from lightning_robust.attacks import PGD
from lightning_robust.datamodules import load_digits_tensors
from lightning_robust.models import ARDStudent
from lightning_robust.models.ard import ard_loss
from lightning_robust.nets import SmallCNN

EPS = 0.1
BATCH = 128


def _nets(teacher_width: int = 2) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return SmallCNN(input_size=8), SmallCNN(input_size=8, width=teacher_width).eval()


def _attack(k: int) -> PGD:
    return PGD(eps=EPS, alpha=EPS / 4, steps=k, random_start=True)


def _model(mode: str, k: int = 10, teacher_width: int = 2) -> ARDStudent:
    student, teacher = _nets(teacher_width)
    return ARDStudent(student, teacher, attack=_attack(k), adversarial_mode=mode, free_replays=4,
                      optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def _loader() -> DataLoader[Any]:
    x, y = load_digits_tensors(8, 1)
    return DataLoader(TensorDataset(x[:1437], y[:1437]), batch_size=BATCH, shuffle=False)


def _step_ratio(k: int, repeat: int, teacher_width: int) -> list[Any]:
    x, y = next(iter(_loader()))
    times = {}
    for mode in ("clean", "pgd"):
        model = _model(mode, k, teacher_width)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)

        def step(model: ARDStudent = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            loss, _, _ = model.training_loss(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        times[mode] = timeit(step, repeat=repeat, warmup=1)
    student, teacher = _nets(teacher_width)
    with torch.no_grad():
        t_teacher = timeit(lambda: teacher(x), repeat=repeat, warmup=1)

    def student_fb() -> None:
        xr = x.clone().requires_grad_(True)
        torch.autograd.grad(student(xr).sum(), xr)

    t_student = timeit(student_fb, repeat=repeat, warmup=1)
    refined = (t_teacher + (k + 1) * t_student) / (t_teacher + t_student)
    return [f"ARD step (PGD-{k}) / KD step, teacher width {teacher_width}", f"{times['pgd'] / times['clean']:.2f}",
            f"{k + 1} (k + 1); {refined:.2f} with the teacher forward", f"KD step {times['clean'] * 1e3:.1f} ms"]


class _EpochTimer(pl.Callback):
    """Times each training epoch; optionally runs ``between()`` after each one (timed separately)."""

    def __init__(self, between: Any = None) -> None:
        self.times: list[float] = []
        self.between_times: list[float] = []
        self.between = between
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._t0)
        if self.between is not None:
            t0 = time.perf_counter()
            with torch.enable_grad():
                self.between()
            self.between_times.append(time.perf_counter() - t0)


def _median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def _lightning_epochs(model: ARDStudent, epochs: int, between: Any = None) -> tuple[float, float]:
    timer = _EpochTimer(between)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(model, train_dataloaders=_loader())
    return _median_after_warmup(timer.times), (_median_after_warmup(timer.between_times) if between else 0.0)


class _PlainLoop:
    """The same ARD work without Lightning: teacher forward, PGD-k, student forward/backward, SGD step."""

    def __init__(self, k: int) -> None:
        self.student, self.teacher = _nets()
        self.teacher.requires_grad_(False)
        self.attack = _attack(k)
        self.optimizer = torch.optim.SGD(self.student.parameters(), lr=0.05, momentum=0.9)
        self.loader = _loader()
        self.step = 0

    def __call__(self) -> None:
        self.student.train()
        for x, y in self.loader:
            with torch.no_grad():
                t_logits = self.teacher(x)
            generator = torch.Generator().manual_seed(self.step)
            x_adv = self.attack(self.student, x, y, generator=generator)
            loss = ard_loss(self.student(x_adv), t_logits, temperature=30.0, alpha=1.0)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            self.step += 1


def run(quick: bool = False) -> str:
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    k, m = 10, 4
    epochs = 2 if quick else 4
    rows = [_step_ratio(k, repeat=3 if quick else 7, teacher_width=w) for w in (1, 2)]
    # The plain loop's epochs interleave with the Lightning ARD epochs, so both see the same machine load.
    epoch = {"pgd": 0.0}
    epoch["pgd"], plain = _lightning_epochs(_model("pgd", k), epochs + 1, between=_PlainLoop(k))
    epoch.update({mode: _lightning_epochs(_model(mode, k), epochs)[0] for mode in ("free", "fast", "clean")})
    rows.append(["free ARD epoch (m = 4) / ARD epoch", f"{epoch['free'] / epoch['pgd']:.2f}",
                 f"{m}/{k + 1} = {m / (k + 1):.2f}", f"ARD epoch {epoch['pgd']:.2f} s"])
    rows.append(["free ARD schedule (1/m of the epochs) / ARD schedule", f"{epoch['free'] / m / epoch['pgd']:.2f}",
                 f"1/{k + 1} = {1 / (k + 1):.2f}", ""])
    rows.append(["fast ARD (FGSM + random start) epoch / ARD epoch", f"{epoch['fast'] / epoch['pgd']:.2f}",
                 f"2/{k + 1} = {2 / (k + 1):.2f}", ""])
    rows.append(["KD epoch / ARD epoch", f"{epoch['clean'] / epoch['pgd']:.2f}", f"1/{k + 1} = {1 / (k + 1):.2f}", ""])
    rows.append(["Lightning ARDStudent epoch / hand-written PyTorch loop epoch", f"{epoch['pgd'] / plain:.3f}",
                 "<= 1.10", f"plain loop {plain:.2f} s"])
    return (
        f"### ARD speed (CPU, digits 8x8, batch {BATCH}, student SmallCNN, teacher SmallCNN width 2, PGD-{k}; "
        f"{'quick mode, ' if quick else ''}medians)\n\n"
        + markdown_table(["ratio", "measured", "expected", "note"], rows)
    )


if __name__ == "__main__":
    print(run(quick=True))
