"""log_image: explicit dispatch to each logger's own image API, PNGs under log dirs, never the current folder."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lightning_robust.utils import log_image
from lightning_robust.utils.plotting import bar_chart


class _Recorder:
    def __init__(self, error: type[Exception] | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.error = error

    def __getattr__(self, name: str):
        def call(*args: Any, **kwargs: Any) -> None:
            if self.error is not None:
                raise self.error(f"{name} rejected its arguments")
            self.calls.append((name, args, kwargs))
        return call


def _bare(cls: type, **attrs: Any) -> Any:
    """An instance of a Lightning logger class without its constructor (tensorboard/wandb/mlflow are absent),
    with ``experiment`` and friends replaced by recorders: the dispatch is what is tested."""
    sub = type(f"Fake{cls.__name__}", (cls,), {k: property(lambda self, v=v: v) for k, v in attrs.items()})
    return sub.__new__(sub)


def _trainer(tmp_path, loggers, **kw) -> SimpleNamespace:
    return SimpleNamespace(global_rank=0, global_step=7, loggers=loggers, default_root_dir=str(tmp_path), **kw)


IMAGE = torch.rand(1, 6, 5, generator=torch.Generator().manual_seed(0))


def test_tensorboard_gets_add_image_for_tensors_and_add_figure_for_figures(tmp_path) -> None:
    rec = _Recorder()
    tb = _bare(TensorBoardLogger, experiment=rec)
    assert log_image(_trainer(tmp_path, [tb]), "saliency/maps", IMAGE) is None
    fig = bar_chart({"a": 1.0})
    log_image(_trainer(tmp_path, [tb]), "hist", fig, step=3)
    (name, args, kwargs), (name2, args2, kwargs2) = rec.calls
    assert name == "add_image" and args[0] == "saliency/maps" and kwargs["global_step"] == 7
    torch.testing.assert_close(args[1], (IMAGE.repeat(3, 1, 1) * 255).round().to(torch.uint8))
    assert name2 == "add_figure" and args2 == ("hist", fig) and kwargs2["global_step"] == 3
    assert not list(tmp_path.iterdir())  # TensorBoard has the image: no stray PNG


def test_a_logger_api_error_is_not_swallowed(tmp_path) -> None:
    tb = _bare(TensorBoardLogger, experiment=_Recorder(error=TypeError))
    with pytest.raises(TypeError, match="add_image rejected"):
        log_image(_trainer(tmp_path, [tb]), "x", IMAGE)


def test_wandb_and_mlflow_use_their_image_apis(tmp_path, monkeypatch) -> None:
    wandb = _bare(WandbLogger)
    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(type(wandb), "log_image", lambda self, **kw: seen.append(kw), raising=False)
    client = _Recorder()
    mlflow = _bare(MLFlowLogger, experiment=client, run_id="run-1")
    log_image(_trainer(tmp_path, [wandb, mlflow]), "a/b", IMAGE)
    assert seen[0]["key"] == "a/b" and seen[0]["step"] == 7
    assert seen[0]["images"][0].shape == (6, 5, 3)
    ((name, args, kwargs),) = client.calls
    assert name == "log_image" and args[0] == "run-1" and kwargs["artifact_file"] == "images/a_b_step0000007.png"
    np.testing.assert_array_equal(args[1], seen[0]["images"][0])


def test_csv_logger_gets_a_png_with_the_exact_pixels(tmp_path) -> None:
    csv = CSVLogger(tmp_path, name="run")
    path = log_image(_trainer(tmp_path, [csv]), "grid", IMAGE)
    assert path == tmp_path / "run" / "version_0" / "images" / "grid_step0000007.png"
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    np.testing.assert_array_equal(arr, (IMAGE[0] * 255).round().to(torch.uint8).numpy())
    fig_path = log_image(_trainer(tmp_path, [csv]), "chart", bar_chart({"a": 1.0}))
    assert fig_path is not None and fig_path.suffix == ".png" and fig_path.is_file()


def test_no_logger_writes_under_an_explicit_root_and_never_into_the_current_folder(tmp_path, monkeypatch) -> None:
    path = log_image(_trainer(tmp_path / "root", []), "img", IMAGE)
    assert path == tmp_path / "root" / "images" / "img_step0000007.png" and path.is_file()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # logger=False is the user's choice: skipped silently
        assert log_image(_trainer(cwd, []), "img", IMAGE) is None
    assert not list(cwd.iterdir())


def test_only_rank_zero_logs_and_bad_images_are_refused(tmp_path) -> None:
    trainer = _trainer(tmp_path, [])
    trainer.global_rank = 1
    assert log_image(trainer, "img", IMAGE) is None
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        log_image(_trainer(tmp_path, []), "img", torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        log_image(_trainer(tmp_path, []), "img", torch.full((1, 2, 2), float("nan")))
    assert isinstance(bar_chart({"a": 1.0}), Figure)

# From main (the cwd fix of issue 19), on a real Trainer:


def test_no_logger_and_no_root_writes_nothing_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # logger=False is the user's choice: skipped silently
        assert log_image(trainer, "grid", torch.rand(3, 4, 4)) is None
    assert os.listdir(tmp_path) == []


def test_fast_dev_run_logs_no_image_and_warns_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = pl.Trainer(fast_dev_run=True, enable_progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
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
