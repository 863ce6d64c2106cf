"""Run by test_resume_sweep in subprocesses: phase "first" trains straight and to mid-training; phase
"resume" (a new process) resumes each mid-training checkpoint. Usage: python -m ... PHASE OUT_DIR."""

import sys
from pathlib import Path

import pytorch_lightning as pl

from lightning_robust.callbacks import DeepKNNPoisonFilter, RNGStateCheckpoint
from tests.reliability.resume_cases import CASES, EPOCHS, TRAINER_KW


def _trainer(out: Path, epochs: int, callbacks: list) -> pl.Trainer:
    if not any(isinstance(c, RNGStateCheckpoint) for c in callbacks):
        # What the CLI installs by default: modules that draw random numbers (attack random starts,
        # dropout) need the generators' states in the checkpoint.
        callbacks = [*callbacks, RNGStateCheckpoint()]
    # A poison filter acting after epoch 0 needs the train loader rebuilt each epoch (it asks for it).
    reload = int(any(isinstance(c, DeepKNNPoisonFilter) and c.filter_epoch > 0 for c in callbacks))
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, deterministic=True, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(out), callbacks=callbacks, reload_dataloaders_every_n_epochs=reload,
                      **TRAINER_KW)


def main(phase: str, out: Path) -> None:
    for name, build in CASES.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        if phase == "first":
            for epochs, file in ((EPOCHS, "straight.ckpt"), (EPOCHS // 2, "mid.ckpt")):
                pl.seed_everything(0)
                model, dm, callbacks = build()
                trainer = _trainer(out, epochs, callbacks)
                trainer.fit(model, datamodule=dm)
                trainer.save_checkpoint(folder / file)
        else:
            pl.seed_everything(12345)  # a different global seed: only what the checkpoint holds may matter
            model, dm, callbacks = build()
            trainer = _trainer(out, EPOCHS, callbacks)
            trainer.fit(model, datamodule=dm, ckpt_path=str(folder / "mid.ckpt"))
            trainer.save_checkpoint(folder / "resumed.ckpt")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
