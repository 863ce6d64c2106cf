import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_robust.cli import LightningRobustCLI

REPO = Path(__file__).resolve().parents[1]


def test_help_runs():
    out = subprocess.run([sys.executable, "-m", "lightning_robust", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fit" in out.stdout and "test" in out.stdout
    ver = subprocess.run([sys.executable, "-m", "lightning_robust", "--version"], capture_output=True, text=True)
    from lightning_robust import __version__

    assert ver.stdout.strip() == f"lightning-robust {__version__}"


def test_quickstart_fast_dev_run_twice_in_same_dir(tmp_path):
    args = ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    cli = LightningRobustCLI(args=args)
    assert cli.trainer.global_step == 1
    assert type(cli.model).__name__ == "Classifier" and type(cli.datamodule).__name__ == "DigitsDataModule"
    # A second run in the same folder must not refuse to overwrite the saved config.
    LightningRobustCLI(args=args)


def test_config_saved_and_reloadable(tmp_path):
    args = ["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=16"]
    LightningRobustCLI(args=args)
    saved = next(tmp_path.rglob("config.yaml"))
    cfg = yaml.safe_load(saved.read_text())
    assert cfg["data"]["init_args"]["batch_size"] == 16
    cli = LightningRobustCLI(args=["fit", "--config", str(saved), "--trainer.fast_dev_run=true",
                                   f"--trainer.default_root_dir={tmp_path / 'again'}"])
    assert cli.datamodule.batch_size == 16


def test_bad_argument_is_reported(tmp_path, capsys):
    with pytest.raises(SystemExit):
        LightningRobustCLI(args=["fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
                                 "--data.init_args.batch_size=-4", f"--trainer.default_root_dir={tmp_path}"])
    assert "batch_size must be a positive integer, got -4" in capsys.readouterr().err


def test_test_subcommand_shows_the_evaluation_callbacks_metrics(tmp_path, capsys):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"callbacks": [
            {"class_path": "lightning_robust.callbacks.RobustnessEvaluation",
             "init_args": {"attacks": {"pgd": {"class_path": "lightning_robust.attacks.PGD",
                                               "init_args": {"eps": 0.1, "steps": 2}}},
                           "num_samples": 32}},
            {"class_path": "lightning_robust.callbacks.CertificationCallback",
             "init_args": {"num_samples": 32, "log_histogram": False}},
        ]},
    }))
    LightningRobustCLI(args=["test", "--config", str(REPO / "configs" / "quickstart.yaml"), "--config", str(config),
                             "--trainer.limit_test_batches=1", f"--trainer.default_root_dir={tmp_path}",
                             "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=32"])
    shown = capsys.readouterr().out
    for key in ("robust/clean_acc", "robust/pgd_acc", "cert/simplex/mean_radius"):
        assert key in shown
