"""The ARD configs: the CPU one runs a fast_dev_run from a teacher checkpoint, the paper one builds its objects."""

from pathlib import Path

import pytest
import torch

from lightning_robust.cli import LightningRobustCLI
from lightning_robust.nets import SmallCNN

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_digits_config_fast_dev_run_from_a_teacher_checkpoint(tmp_path):
    teacher = SmallCNN(in_channels=1, num_classes=10, input_size=8)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    cli = LightningRobustCLI(args=["fit", "--config", str(CONFIGS / "ard_digits.yaml"),
                                   f"--model.init_args.teacher={tmp_path / 'teacher.pt'}",
                                   "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                                   "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 1
    model = cli.model
    assert type(model.net).__name__ == "MLP" and type(model.teacher).__name__ == "SmallCNN"
    assert all(torch.equal(a, b) for a, b in zip(model.teacher.state_dict().values(), teacher.state_dict().values()))
    assert (model.temperature, model.alpha, model.distill_mode) == (1.0, 1.0, "pgd")
    assert model.attack.steps == 10 and model.attack.eps == 0.1 and model.attack.alpha == 0.025
    evaluation = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RobustnessEvaluation")
    assert evaluation.attacks["pgd20"].steps == 20


def test_cifar10_config_builds_the_paper_setup(tmp_path):
    from lightning_robust.nets import WideResNet

    # The config names a WRN-34-10 teacher (a 180 MB file); a WRN-10-1 of the same family stands in for it here.
    text = (CONFIGS / "ard_cifar10.yaml").read_text()
    assert "depth: 34" in text and "widen_factor: 10" in text
    torch.save(WideResNet(depth=10, widen_factor=1).state_dict(), tmp_path / "wrn.pt")
    cli = LightningRobustCLI(args=["--config", str(CONFIGS / "ard_cifar10.yaml"), "--data.init_args.download=false",
                                   f"--model.init_args.teacher={tmp_path / 'wrn.pt'}",
                                   "--model.init_args.teacher_net.init_args.depth=10",
                                   "--model.init_args.teacher_net.init_args.widen_factor=1",
                                   f"--trainer.default_root_dir={tmp_path}"], run=False)
    model = cli.model
    assert type(model.net).__name__ == "MobileNetV2" and type(model.teacher).__name__ == "WideResNet"
    assert model.attack.steps == 10 and model.attack.eps == pytest.approx(8 / 255)
    assert model.attack.alpha == pytest.approx(2 / 255)
    # The authors' effective step: nn.KLDivLoss()'s element mean at their SGD lr, their train-mode attack.
    assert (model.temperature, model.alpha, model.kl_reduction) == (30.0, 1.0, "mean")
    assert model.attack_train_mode and model.train_attack.model_mode == "train"
    config = model.configure_optimizers()
    group = config["optimizer"].param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 2e-4)
    assert config["lr_scheduler"]["scheduler"].milestones == {100: 1, 150: 1}
    evaluation = next(c for c in cli.trainer.callbacks if type(c).__name__ == "RobustnessEvaluation")
    assert evaluation.attacks["pgd20"].steps == 20
