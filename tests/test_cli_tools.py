"""The CLI's own commands and defaults: --version, configs (shipped in the wheel), --optimizer, the reliability
switches in --print_config, typo suggestions first, and predict's prediction files."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from lightning_robust import __version__
from lightning_robust.callbacks import AtomicCheckpointIO, FiniteLossGuard, PredictionWriter, RNGStateCheckpoint
from lightning_robust.cli import LightningRobustCLI, list_configs, main

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "configs" / "quickstart.yaml")
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def test_version_is_answered_by_the_console_script_entry_point(capsys) -> None:
    main(["--version"])  # what `lightning-robust --version` calls
    assert capsys.readouterr().out.strip() == f"lightning-robust {__version__}"


def test_configs_lists_prints_and_copies(tmp_path, capsys) -> None:
    assert list_configs() == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    main(["configs"])
    out = capsys.readouterr().out
    assert all(f"  {name}\n" in out for name in list_configs())
    main(["configs", "quickstart"])
    assert capsys.readouterr().out == Path(QUICK).read_text()
    main(["configs", "quickstart.yaml", "--copy", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "quickstart.yaml").read_text() == Path(QUICK).read_text()
    with pytest.raises(SystemExit) as exc:
        main(["configs", "quickstrat"])
    assert exc.value.code == 2 and "did you mean quickstart" in capsys.readouterr().err


@pytest.mark.slow
def test_the_wheel_ships_every_config(tmp_path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("lightning_robust-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"lightning_robust/configs/{n}.yaml" for n in list_configs()} <= names


def test_misspelt_key_answers_with_the_closest_key_first(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        LightningRobustCLI(args=["fit", "--config", QUICK, "--trainer.max_epohcs=3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.splitlines()[0].startswith("error: unknown key 'trainer.max_epohcs'; did you mean 'trainer.max_epochs'")
    assert "usage:" not in err and len(err.splitlines()) <= 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_epohcs: 2\n")
    with pytest.raises(SystemExit):
        LightningRobustCLI(args=["fit", "--config", QUICK, "--config", str(bad)])
    assert "did you mean 'trainer.max_epochs'" in capsys.readouterr().err.splitlines()[0]


def test_reliability_defaults_are_in_print_config_and_switch_off(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        LightningRobustCLI(args=["fit", "--config", QUICK, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["reliability"] == {"atomic_checkpoint_io": True, "finite_loss_guard": True,
                                      "rng_state_checkpoint": True, "prediction_writer": True}
    base = ["--config", QUICK, f"--trainer.default_root_dir={tmp_path}", *QUIET]  # run=False: no subcommand
    on = LightningRobustCLI(args=base, run=False).trainer
    assert any(isinstance(c, FiniteLossGuard) for c in on.callbacks)
    assert any(isinstance(c, RNGStateCheckpoint) for c in on.callbacks)
    assert isinstance(on.strategy.checkpoint_io, AtomicCheckpointIO)
    off = LightningRobustCLI(args=[*base, "--reliability.finite_loss_guard=false",
                                   "--reliability.rng_state_checkpoint=false",
                                   "--reliability.atomic_checkpoint_io=false"], run=False).trainer
    assert not any(isinstance(c, (FiniteLossGuard, RNGStateCheckpoint)) for c in off.callbacks)
    assert not isinstance(off.strategy.checkpoint_io, AtomicCheckpointIO)


def test_optimizer_and_lr_scheduler_as_in_lightning_cli(tmp_path) -> None:
    base = ["--config", QUICK, f"--trainer.default_root_dir={tmp_path}", *QUIET]
    kept = LightningRobustCLI(args=base, run=False).model.configure_optimizers()
    kept_opt = kept if isinstance(kept, torch.optim.Optimizer) else kept["optimizer"]
    assert type(kept_opt) is torch.optim.Adam and kept_opt.param_groups[0]["lr"] == 0.002  # the config's
    cli = LightningRobustCLI(args=[*base, "--optimizer=torch.optim.SGD", "--optimizer.lr=0.05",
                                   "--lr_scheduler=torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size=3"],
                             run=False)
    out = cli.model.configure_optimizers()
    opt, sched = out if isinstance(out, tuple) else (out["optimizer"], out["lr_scheduler"])
    opt = opt[0] if isinstance(opt, list) else opt
    sched = sched[0] if isinstance(sched, list) else sched
    sched = sched["scheduler"] if isinstance(sched, dict) else sched
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.05
    assert type(sched) is torch.optim.lr_scheduler.StepLR and sched.step_size == 3
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for p in cli.model.parameters() if p.requires_grad}


def test_optimizer_is_refused_for_manual_optimization(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        LightningRobustCLI(args=["--config", str(REPO / "configs" / "gan_digits_teacher.yaml"),
                                 f"--trainer.default_root_dir={tmp_path}", "--optimizer=torch.optim.SGD",
                                 "--optimizer.lr=0.1", *QUIET], run=False)
    assert "uses manual optimization" in capsys.readouterr().err


def test_predict_writes_the_model_outputs(tmp_path) -> None:
    cli = LightningRobustCLI(args=["predict", "--config", QUICK, f"--trainer.default_root_dir={tmp_path}",
                                   "--trainer.limit_predict_batches=2", *QUIET])
    path = tmp_path / "predictions" / "predictions_rank0.pt"
    assert any(isinstance(c, PredictionWriter) for c in cli.trainer.callbacks)
    saved = torch.load(path, weights_only=True)
    (preds,), (indices,) = saved["predictions"], saved["batch_indices"]
    assert len(preds) == len(indices) == 2
    loader = cli.datamodule.predict_dataloader()
    x = next(iter(loader))[0]
    cli.model.eval()
    with torch.no_grad():
        expected = cli.model.predict_step((x, torch.zeros(len(x), dtype=torch.long)), 0)
    expected = expected if torch.is_tensor(expected) else expected[0]
    torch.testing.assert_close(preds[0], expected)
    assert indices[0] == list(range(len(x)))
