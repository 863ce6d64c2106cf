"""Cost of each evaluation callback at its defaults, as a share of the training epoch it evaluates.

One ``trainer.fit`` per seed trains the quickstart model (SmallCNN on the bundled 8x8 digits, batch 64,
Adam 1e-3) for ``EPOCHS`` epochs with every evaluation callback attached side by side at its defaults
(``RobustnessEvaluation`` needs an attack: PGD-10, eps 0.1; figures off). Each callback's ``evaluate`` call
and each training epoch (from its start to the start of its validation run: Lightning validates inside the
training epoch, before ``on_train_epoch_end``) are timed in the same run; the table reports callback seconds
/ training-epoch seconds (medians over epochs, then mean ± std over seeds). A second table checks that
``CertificationCallback``'s radii chosen from the model's own scale give a curve that is not all zeros,
beside the old fixed radii (0.05, 0.1, 0.25).
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import pytorch_lightning as pl
import torch

from benchmarks.common import DEFAULT_SEEDS, markdown_table, mean_std, over_seeds
from lightning_robust.attacks import PGD
from lightning_robust.callbacks import (
    CertificationCallback,
    EvaluationCallback,
    RobustnessEvaluation,
    SaliencyCertification,
)
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.models import Classifier
from lightning_robust.nets import SmallCNN

EPOCHS = 4
OLD_RADII = (0.05, 0.1, 0.25)


class _EpochTimer(pl.Callback):
    """Training time of each epoch: from its start to the start of the validation run at its end.

    (Lightning validates inside the training epoch, before ``on_train_epoch_end``; the evaluation callbacks
    run there, so the epoch's end would count them too.)
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0: float | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is not None:
            self.times.append(time.perf_counter() - self._t0)
            self._t0 = None


def _timed(cb: EvaluationCallback) -> list[float]:
    """Wrap ``cb.evaluate`` so that each call's wall-clock time is recorded."""
    times: list[float] = []
    inner = cb.evaluate

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        times.append(time.perf_counter() - t0)
        return out

    cb.evaluate = evaluate  # type: ignore[method-assign]
    return times


def _callbacks() -> dict[str, EvaluationCallback]:
    return {
        "RobustnessEvaluation (PGD-10)": RobustnessEvaluation({"pgd10": PGD(eps=0.1, alpha=0.025, steps=10)}),
        "CertificationCallback (simplex)": CertificationCallback(log_histogram=False),
        "CertificationCallback (decision_boundary)": CertificationCallback("decision_boundary", log_histogram=False),
        "SaliencyCertification": SaliencyCertification(log_images=False),
    }


def _one_seed(seed: int, quick: bool) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    callbacks = _callbacks()
    times = {name: _timed(cb) for name, cb in callbacks.items()}
    epochs = _EpochTimer()
    model = Classifier(SmallCNN(1, 10, 8))
    dm = DigitsDataModule(batch_size=64, image_size=8, seed=seed)
    trainer = pl.Trainer(max_epochs=2 if quick else EPOCHS, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[epochs, *callbacks.values()])
    trainer.fit(model, datamodule=dm)
    epoch = statistics.median(epochs.times)
    out: dict[str, Any] = {"epoch": epoch}
    for name, ts in times.items():
        out[name] = statistics.median(ts) / epoch
    cert = callbacks["CertificationCallback (simplex)"]
    assert isinstance(cert, CertificationCallback) and cert.radii is not None
    out["auto_radii"] = list(cert.radii)
    out["auto_acc"] = [cert.last_results[f"cert/simplex/acc@{r:g}"] for r in cert.radii]
    old = CertificationCallback(radii=OLD_RADII, log_histogram=False)
    res = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[old]).validate(model, datamodule=dm, verbose=False)[0]
    out["old_acc"] = [res[f"cert/simplex/acc@{r:g}"] for r in OLD_RADII]
    out["mean_radius"] = cert.last_results["cert/simplex/mean_radius"]
    return out


def run(quick: bool = False) -> str:
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    seeds = DEFAULT_SEEDS[:1] if quick else DEFAULT_SEEDS
    runs = over_seeds(lambda s: _one_seed(s, quick), seeds)
    names = list(_callbacks())
    rows = [["training epoch (seconds)", mean_std([r["epoch"] for r in runs])]]
    rows += [[name, mean_std([r[name] for r in runs])] for name in names]
    cert_rows = []
    for s, r in zip(seeds, runs):
        auto = ", ".join(f"acc@{rad:g} = {a:.3f}" for rad, a in zip(r["auto_radii"], r["auto_acc"]))
        old = ", ".join(f"acc@{rad:g} = {a:.3f}" for rad, a in zip(OLD_RADII, r["old_acc"]))
        cert_rows.append([s, f"{r['mean_radius']:.3g}", auto, old])
    return (
        f"### Evaluation callbacks at their defaults: cost per evaluation / training epoch (SmallCNN, 8x8 digits, "
        f"batch 64, {EPOCHS} epochs, seeds {list(seeds)}, 1 torch thread)\n\n"
        + markdown_table(["callback (defaults)", "callback time / training-epoch time (mean ± std over seeds)"],
                         rows)
        + "\n\nEach ratio is the median over the run's epochs of one `evaluate` call over the median training "
        "epoch (validation excluded); all callbacks ran side by side in the same fit, figures off (no logger).\n\n"
        "### CertificationCallback radii from the model's scale (simplex, last epoch)\n\n"
        + markdown_table(["seed", "mean radius", "auto radii (quartiles of the first evaluation)",
                          f"old fixed radii {OLD_RADII}"], cert_rows)
        + "\n\nBoth columns count the same validation digits (the default `num_samples`); the auto radii are "
        "quartiles rounded to two digits, so equal quartiles collapse into one radius."
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(run())
