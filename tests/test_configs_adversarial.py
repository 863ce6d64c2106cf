"""The adversarial-training configs: the CPU one runs, the paper-scale one builds every object it names."""

from pathlib import Path

import pytest

from lightning_robust.cli import LightningRobustCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_digits_config_fast_dev_run(tmp_path):
    cli = LightningRobustCLI(args=["fit", "--config", str(CONFIGS / "adversarial_training_digits.yaml"),
                                   "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                                   "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 1
    model = cli.model
    assert type(model.attack).__name__ == "PGD" and model.attack.steps == 5 and model.attack.eps == 0.1
    assert type(model.tripwire_attack).__name__ == "PGD" and model.tripwire_batches == 2
    evaluation = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RobustnessEvaluation")
    assert set(evaluation.attacks) == {"pgd20", "fgsm"} and evaluation.attacks["pgd20"].steps == 20


def test_cifar10_config_builds_madry_setup(tmp_path):
    cli = LightningRobustCLI(args=["--config", str(CONFIGS / "adversarial_training_cifar10.yaml"),
                                   "--data.init_args.download=false", f"--trainer.default_root_dir={tmp_path}"],
                             run=False)
    model = cli.model
    assert type(model.net).__name__ == "ResNet18"
    assert model.attack.steps == 7 and model.attack.eps == pytest.approx(8 / 255)
    assert model.attack.alpha == pytest.approx(2 / 255)
    optimizer = model.configure_optimizers()["optimizer"]
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 5e-4)
    evaluation = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RobustnessEvaluation")
    assert evaluation.attacks["pgd20"].steps == 20 and evaluation.attacks["recoloradv"].resolution == (16, 32, 32)
