"""No loading path unpickles a checkpoint's payload, whatever the environment or the path form (issue 18).

Every test builds a booby-trapped checkpoint in the real ``torch.save`` zip format: next to ordinary
tensors it holds an object whose unpickling would create a marker file. ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
is set for every test of this module: torch then unpickles with ``weights_only=False`` wherever a caller
left ``weights_only`` unset, which is what Lightning's own loader does.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from pathlib import Path

import fsspec
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_robust.utils.checkpoint as ckpt_mod
from lightning_robust.callbacks import AtomicCheckpointIO
from lightning_robust.nets import MLP
from lightning_robust.utils import CheckpointError, load_module, safe_load

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Unpickling this object would create the marker file: the payload of a booby-trapped checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(autouse=True)
def _force_unsafe_torch_load(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


def _evil_checkpoint(tmp_path: Path, net: torch.nn.Module | None = None) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    net = net if net is not None else MLP(16, 2, hidden=(4,))
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "epoch": 0, "global_step": 0, "evil": _Payload(str(marker))}, path)
    return path, marker


def _payload_would_run(path: Path, marker: Path) -> None:
    """Control: the checkpoint really is booby-trapped (a plain unpickle runs the payload)."""
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


def _refusal(load, marker: Path, pattern: str) -> None:
    """Run ``load``; the payload must not have run, and the error must be a CheckpointError matching ``pattern``.

    The marker is checked first, so that a loader that unpickles the payload fails as "the payload ran",
    whatever it raises afterwards.
    """
    error: Exception | None = None
    try:
        load()
    except Exception as err:  # any type: checked below, after the marker
        error = err
    assert not marker.exists(), "the checkpoint's pickled payload ran"
    assert isinstance(error, CheckpointError), repr(error)
    assert re.search(pattern, str(error)), str(error)


def _tiny_fit(tmp_path: Path, plugin: bool = True, **fit_kw) -> pl.Trainer:
    from lightning_robust.models import Classifier

    data = DataLoader(TensorDataset(torch.rand(8, 16), torch.randint(0, 2, (8,))), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         plugins=[AtomicCheckpointIO()] if plugin else None)
    trainer.fit(Classifier(MLP(16, 2, hidden=(4,))), data, **fit_kw)
    return trainer


def test_control_the_environment_variable_makes_plain_torch_load_unpickle(tmp_path):
    path, marker = _evil_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        torch.load(path)  # what Lightning's loader calls (weights_only unset)
    assert marker.exists()


@pytest.mark.parametrize("weights_only", [None, False])
def test_trainer_fit_resume_with_the_plugin_never_runs_the_payload(tmp_path, weights_only):
    path, marker = _evil_checkpoint(tmp_path)
    # weights_only=False is ignored with our warning (attributed to Lightning's frame, so say it here).
    expect = pytest.warns(UserWarning, match="weights_only=False is ignored") if weights_only is False \
        else contextlib.nullcontext()
    with expect:
        _refusal(lambda: _tiny_fit(tmp_path, ckpt_path=str(path), weights_only=weights_only), marker,
                 r"evil\.ckpt.*not a weights-only file")
    _payload_would_run(path, marker)


def test_plugin_warns_that_weights_only_false_is_ignored(tmp_path):
    path, _ = _evil_checkpoint(tmp_path)
    with pytest.warns(UserWarning, match="weights_only=False is ignored"), pytest.raises(CheckpointError):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)


def test_plugin_resume_still_restores_a_good_checkpoint(tmp_path):
    first = _tiny_fit(tmp_path)
    good = tmp_path / "good.ckpt"
    first.save_checkpoint(good)
    weights = {k: v.clone() for k, v in first.lightning_module.state_dict().items()}
    resumed = _tiny_fit(tmp_path, ckpt_path=str(good))  # max_epochs=1 already reached: restores, trains nothing
    assert resumed.current_epoch == 1
    for k, v in resumed.lightning_module.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_url_checkpoint_is_fetched_to_a_file_and_loaded_weights_only(tmp_path, monkeypatch):
    path, marker = _evil_checkpoint(tmp_path)
    fetched: list[str] = []

    def fake_fetch(url: str, dest: Path) -> None:  # stands in for the download; nothing leaves the machine
        fetched.append(url)
        shutil.copyfile(path, dest)

    monkeypatch.setattr(ckpt_mod, "_fetch", fake_fetch)
    url = "https://example.invalid/shared/evil.ckpt"
    _refusal(lambda: _tiny_fit(tmp_path, ckpt_path=url), marker,
             r"https://example\.invalid/shared/evil\.ckpt.*not a weights-only")
    assert fetched == [url]
    _refusal(lambda: safe_load(url), marker, "not a weights-only")

    good = {"state_dict": {"w": torch.arange(5.0)}, "epoch": 2}
    torch.save(good, path)
    back = AtomicCheckpointIO().load_checkpoint(url)
    assert back["epoch"] == 2 and torch.equal(back["state_dict"]["w"], good["state_dict"]["w"])


def test_unfetchable_url_is_a_clear_error(monkeypatch):
    def refused(url: str, dest: Path) -> None:
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(ckpt_mod, "_fetch", refused)
    with pytest.raises(CheckpointError, match=r"'http://host\.invalid/a\.ckpt' could not be fetched"):
        safe_load("http://host.invalid/a.ckpt")


def test_fsspec_url_goes_through_the_same_weights_only_path(tmp_path):
    # memory:// is an in-process fsspec file system: the real fetch code runs, nothing is downloaded.
    path, marker = _evil_checkpoint(tmp_path)
    fs = fsspec.filesystem("memory")
    fs.pipe("/issue18/evil.ckpt", path.read_bytes())
    try:
        _refusal(lambda: _tiny_fit(tmp_path, ckpt_path="memory://issue18/evil.ckpt"), marker,
                 r"memory://issue18/evil\.ckpt.*not a weights-only")
    finally:
        fs.rm("/issue18/evil.ckpt")


def test_cli_fit_with_ckpt_path_never_runs_the_payload(tmp_path):
    from lightning_robust.cli import LightningRobustCLI
    from lightning_robust.nets import SmallCNN

    path, marker = _evil_checkpoint(tmp_path, SmallCNN(in_channels=1, num_classes=10, input_size=8))
    fs = fsspec.filesystem("memory")
    fs.pipe("/issue18/cli.ckpt", path.read_bytes())
    base = ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", "--trainer.max_steps=1"]
    try:
        # A local path, and a URL form the CLI's own hyper-parameter peek skips (it reads local files only).
        for ckpt in ("memory://issue18/cli.ckpt", str(path)):
            _refusal(lambda: LightningRobustCLI(args=[*base, f"--ckpt_path={ckpt}"]), marker,  # noqa: B023
                     r"(evil|cli)\.ckpt.*not a weights-only file")
    finally:
        fs.rm("/issue18/cli.ckpt")


def test_teacher_generator_and_feature_checkpoints_never_run_the_payload(tmp_path):
    from lightning_robust.models import ARDStudent, DistilledGAN
    from lightning_robust.nets import MLPGenerator

    def gen() -> MLPGenerator:
        return MLPGenerator(latent_dim=2, out_shape=(2,), hidden=(4,))

    path, marker = _evil_checkpoint(tmp_path)
    loaders = {
        "safe_load": lambda: safe_load(path),
        "load_module": lambda: load_module(path, into=MLP(16, 2, hidden=(4,))),
        "ARD teacher": lambda: ARDStudent(MLP(16, 2, hidden=(4,)), teacher=str(path),
                                          teacher_net=MLP(16, 2, hidden=(4,))),
        "DistilledGAN teacher": lambda: DistilledGAN(gen(), gen(), teacher_checkpoint=str(path)),
        "DistilledGAN teacher with prefix": lambda: DistilledGAN(gen(), gen(), teacher_checkpoint=str(path),
                                                                 teacher_prefix="generator."),
    }
    for load in loaders.values():
        _refusal(load, marker, r"evil\.ckpt.*not a weights-only file")


def test_load_from_checkpoint_of_every_module_and_datamodule_base_is_weights_only(tmp_path, monkeypatch):
    from lightning_robust.datamodules import DigitsDataModule
    from lightning_robust.models import GAN, Classifier, NWDomainAdaptation

    path, marker = _evil_checkpoint(tmp_path)
    _refusal(lambda: Classifier.load_from_checkpoint(path, net=MLP(16, 2, hidden=(4,))), marker,
             r"evil\.ckpt.*not a weights-only file")
    _refusal(lambda: DigitsDataModule.load_from_checkpoint(str(path)), marker, r"evil\.ckpt.*not a weights-only")
    monkeypatch.setattr(ckpt_mod, "_fetch", lambda url, dest: shutil.copyfile(path, dest))
    _refusal(lambda: Classifier.load_from_checkpoint("https://example.invalid/evil.ckpt",
                                                     net=MLP(16, 2, hidden=(4,))), marker, "not a weights-only")
    from lightning_robust.utils import WeightsOnlyLoadFromCheckpoint

    for cls in (Classifier, GAN, NWDomainAdaptation, DigitsDataModule):
        assert issubclass(cls, WeightsOnlyLoadFromCheckpoint), cls

    good = tmp_path / "good.ckpt"
    trainer = _tiny_fit(tmp_path)
    trainer.save_checkpoint(good)
    with pytest.warns(UserWarning, match="weights_only=False is ignored"):
        back = Classifier.load_from_checkpoint(good, net=MLP(16, 2, hidden=(4,)), weights_only=False)
    for k, v in trainer.lightning_module.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
