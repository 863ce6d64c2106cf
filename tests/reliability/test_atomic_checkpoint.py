"""Atomic checkpoint writes and fault injection: kill a process mid-save, kill one DDP rank, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_robust.callbacks.atomic_checkpoint_io as aio
from lightning_robust.callbacks import AtomicCheckpointIO
from lightning_robust.utils import safe_load
from tests.helpers.ddp import REPO

# ----------------------------------------------------------------------------------------- unit properties


def test_atomic_write_replaces_whole_file_and_cleans_stale_partials(tmp_path):
    target = tmp_path / "sub" / "last.ckpt"
    stale = target.parent / ".last.ckpt.partial-99999"
    target.parent.mkdir()
    stale.write_bytes(b"half a checkpoint")
    data = os.urandom(10_000)
    aio.atomic_write_bytes(data, target, chunk_size=997)  # many chunks, the last one short
    assert target.read_bytes() == data
    assert not stale.exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_failed_write_keeps_old_file_and_leaves_no_partial(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old complete checkpoint")

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(aio.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        aio.atomic_write_bytes(b"new" * 1000, target)
    assert target.read_bytes() == b"old complete checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow  # the second process imports Lightning
def test_concurrent_saves_to_one_path_keep_each_others_partial_files(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    mine, theirs = os.urandom(5000), os.urandom(3000)
    real_fsync = os.fsync
    other_saved: list[bool] = []

    def fsync_then_another_process_saves(fd):
        real_fsync(fd)
        if not other_saved:
            other_saved.append(True)
            # This process's partial file is written but not yet renamed: a second process saves the same path.
            script = ("import sys; from lightning_robust.callbacks.atomic_checkpoint_io import atomic_write_bytes; "
                      "atomic_write_bytes(bytes.fromhex(sys.argv[2]), sys.argv[1])")
            subprocess.run([sys.executable, "-c", script, str(target), theirs.hex()], check=True, cwd=REPO,
                           timeout=300)
            assert target.read_bytes() == theirs

    monkeypatch.setattr(aio.os, "fsync", fsync_then_another_process_saves)
    aio.atomic_write_bytes(mine, target)  # before unique partial names: FileNotFoundError at os.replace
    assert other_saved and target.read_bytes() == mine  # the later rename wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_only_partials_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "last.ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    host = aio._host_tag()
    of_dead = tmp_path / f".last.ckpt.partial-{host}-{int(dead.stdout)}-abc"
    of_live = tmp_path / f".last.ckpt.partial-{host}-{os.getppid()}-abc"
    foreign_new = tmp_path / ".last.ckpt.partial-otherhost-1-abc"
    foreign_old = tmp_path / ".last.ckpt.partial-otherhost-2-abc"
    for p in (of_dead, of_live, foreign_new, foreign_old):
        p.write_bytes(b"half")
    two_days_ago = os.path.getmtime(foreign_old) - 2 * 24 * 3600
    os.utime(foreign_old, (two_days_ago, two_days_ago))
    aio.atomic_write_bytes(b"whole", target)
    assert target.read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", of_live.name, foreign_new.name])


def test_checkpoint_io_round_trip_is_weights_only_loadable(tmp_path):
    ckpt = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 3, "name": "x"}
    AtomicCheckpointIO().save_checkpoint(ckpt, tmp_path / "a.ckpt")
    back = safe_load(tmp_path / "a.ckpt")
    assert back["epoch"] == 3 and torch.equal(back["state_dict"]["w"], ckpt["state_dict"]["w"])
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint(ckpt, tmp_path / "b.ckpt", storage_options={"x": 1})


# ------------------------------------------------------------------------------------ fault injection

_TRAIN_SCRIPT = r'''
import json, os, signal, sys
from datetime import timedelta
from functools import partial

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import lightning_robust.callbacks.atomic_checkpoint_io as aio
from lightning_robust.callbacks import AtomicCheckpointIO
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.models import Classifier
from lightning_robust.nets import SmallCNN

mode, devices, kill_epoch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ckpt_dir = os.path.abspath("ckpts")


class DieMidWrite:
    """A file whose first write stores half its bytes, then the process is SIGKILLed (no cleanup runs)."""

    def __init__(self, fh):
        self.fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()

    def write(self, data):
        self.fh.write(bytes(data[: len(data) // 2]))
        self.fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name):
        return getattr(self.fh, name)


class Fault(pl.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # Called while the checkpoint is being assembled, just before its bytes are written.
        if mode == "kill_save" and trainer.current_epoch == kill_epoch:
            aio.open = lambda path, m: DieMidWrite(open(path, m))

    def on_train_epoch_start(self, trainer, pl_module):
        if mode == "kill_rank" and trainer.current_epoch == kill_epoch and trainer.global_rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)


def fit(ckpt_path, callbacks, max_epochs=3):
    pl.seed_everything(0)
    model = Classifier(SmallCNN(input_size=8), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    dm = DigitsDataModule(batch_size=32, seed=1)
    strategy = "auto"
    if devices > 1:
        from pytorch_lightning.strategies import DDPStrategy
        strategy = DDPStrategy(timeout=timedelta(seconds=60))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy,
                         max_epochs=max_epochs, limit_train_batches=8, limit_val_batches=2,
                         deterministic=True, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=".",
                         plugins=[AtomicCheckpointIO()], callbacks=callbacks)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


saver = ModelCheckpoint(dirpath=ckpt_dir, filename="ep{epoch}", auto_insert_metric_name=False, save_last=True,
                        save_top_k=-1)
if mode in ("kill_save", "kill_rank"):
    fit(None, [saver, Fault()])
    raise SystemExit("the fault was not injected")
resumed, trainer = fit("last", [saver])
straight, _ = fit(None, [])
flat = lambda m: torch.cat([p.detach().flatten() for p in m.state_dict().values() if p.is_floating_point()])
if trainer.global_rank == 0:
    with open(os.environ["RESULT_PATH"], "w") as fh:
        json.dump({"epochs": trainer.current_epoch, "step": trainer.global_step,
                   "max_diff": float((flat(resumed) - flat(straight)).abs().max())}, fh)
'''


def _run(tmp_path: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    (tmp_path / "train.py").write_text(_TRAIN_SCRIPT)
    env = dict(os.environ, RESULT_PATH=str(tmp_path / "result.json"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "train.py", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _check_checkpoints_all_load(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.glob("*.ckpt"))
    for name in names:
        safe_load(folder / name)  # raises CheckpointError on a truncated file
    return names


@pytest.mark.slow
def test_kill_during_checkpoint_save_keeps_previous_and_resume_finishes(tmp_path):
    proc = _run(tmp_path, "kill_save", "1", "1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = tmp_path / "ckpts"
    # Epoch 0's checkpoints are complete; epoch 1's write died halfway and is nowhere a user would look.
    assert _check_checkpoints_all_load(ckpts) == ["ep0.ckpt", "last.ckpt"]
    assert safe_load(ckpts / "last.ckpt")["epoch"] == 0
    partials = [p.name for p in ckpts.iterdir() if p.name.startswith(".")]
    assert len(partials) == 1 and ".partial-" in partials[0] and not partials[0].endswith(".ckpt")

    proc = _run(tmp_path, "resume", "1", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["epochs"] == 3 and result["step"] == 24
    # Resuming from epoch 0's checkpoint reproduces the uninterrupted run exactly (deterministic CPU).
    assert result["max_diff"] == 0.0
    assert not any(p.name.startswith(".") for p in ckpts.iterdir()), "stale partial file not cleaned"
    assert _check_checkpoints_all_load(ckpts) == ["ep0.ckpt", "ep1.ckpt", "ep2.ckpt", "last.ckpt"]


@pytest.mark.slow
@pytest.mark.ddp
def test_kill_one_ddp_rank_then_rerun_with_last_finishes(tmp_path):
    proc = _run(tmp_path, "kill_rank", "2", "2")
    assert proc.returncode != 0
    assert not (tmp_path / "result.json").exists()
    ckpts = tmp_path / "ckpts"
    assert _check_checkpoints_all_load(ckpts) == ["ep0.ckpt", "ep1.ckpt", "last.ckpt"]

    proc = _run(tmp_path, "resume", "2", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["epochs"] == 3 and result["step"] == 24
    assert result["max_diff"] == 0.0
