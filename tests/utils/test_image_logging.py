"""log_image never writes into the current directory unless asked to."""

import os
from pathlib import Path

import pytorch_lightning as pl
import torch

from lightning_robust.utils import log_image


def test_no_logger_and_no_root_writes_nothing_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    assert log_image(trainer, "grid", torch.rand(3, 4, 4)) is None
    assert os.listdir(tmp_path) == []


def test_chosen_root_and_logger_dir_get_the_png(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    trainer = pl.Trainer(logger=False, default_root_dir=str(root), enable_progress_bar=False)
    out = log_image(trainer, "a/b", torch.rand(1, 4, 4))
    assert out is not None and out.parent == root / "images" and out.is_file()
    logged = pl.Trainer(logger=pl.loggers.CSVLogger(str(tmp_path / "csv")), enable_progress_bar=False)
    out2 = log_image(logged, "x", torch.rand(3, 4, 4), step=3)
    assert out2 is not None and Path(logged.loggers[0].log_dir) / "images" == out2.parent
    assert sorted(p.name for p in tmp_path.iterdir()) == ["csv", "run"]
