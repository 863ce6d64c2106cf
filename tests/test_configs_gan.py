"""The GAN-compression configs: paper-scale ones parse and hit the paper's ratios; CPU ones run a fast_dev_run."""

import importlib
from pathlib import Path

import pytest
import torch

from lightning_robust.cli import LightningRobustCLI
from lightning_robust.nets import DCGANGenerator
from lightning_robust.utils import count_parameters

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
PAPER = {"mnist": ("MNISTDataModule", 1669.0), "cifar10": ("CIFAR10DataModule", 58.0),
         "celeba": ("CelebADataModule", 87.0)}


def _require_datamodule(datamodule: str) -> None:
    assert hasattr(importlib.import_module("lightning_robust.datamodules"), datamodule), datamodule


def _common(tmp_path: Path) -> list[str]:
    return ["--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.strategy=auto"]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_parse_at_the_paper_ratios(name, tmp_path):  # run=False: no subcommand
    datamodule, paper_ratio = PAPER[name]
    _require_datamodule(datamodule)
    teacher = LightningRobustCLI(args=["--config", str(CONFIGS / f"gan_{name}_teacher.yaml"),
                                       *_common(tmp_path)], run=False)
    assert type(teacher.model).__name__ == "GAN" and type(teacher.datamodule).__name__ == datamodule
    student = LightningRobustCLI(args=["--config", str(CONFIGS / f"distilled_gan_{name}.yaml"),
                                       "--model.init_args.teacher_checkpoint=null", *_common(tmp_path)], run=False)
    model = student.model
    # the distilled teacher is the architecture the teacher config trains
    assert count_parameters(model.teacher) == count_parameters(teacher.model.generator)
    assert model.compression_ratio == count_parameters(model.teacher) / count_parameters(model.generator)
    assert model.compression_ratio == pytest.approx(paper_ratio, rel=0.005)
    assert model.mode == ("joint" if name == "celeba" else "mse")


@pytest.mark.slow
def test_cpu_configs_fast_dev_run(tmp_path):
    teacher = LightningRobustCLI(args=["fit", "--config", str(CONFIGS / "gan_digits_teacher.yaml"),
                                       *_common(tmp_path / "t")])
    assert teacher.trainer.global_step == 2  # one batch: a critic step and a generator step
    cb = next(c for c in teacher.trainer.callbacks if type(c).__name__ == "GANEvaluation")
    assert cb.last == {}  # every_n_epochs=20: not due after the one fast_dev_run epoch (no extra "last epoch")
    scores = cb.score(teacher.trainer, teacher.model)  # the config's feature net and settings score the GAN
    assert set(scores) >= {"fid", "kid", "is"} and cb.metric_names()["fid"] == "val/fid_smallcnn_random"

    torch.save(teacher.model.generator.state_dict(), tmp_path / "teacher.pt")
    student = LightningRobustCLI(args=["fit", "--config", str(CONFIGS / "distilled_gan_digits.yaml"),
                                       f"--model.init_args.teacher_checkpoint={tmp_path / 'teacher.pt'}",
                                       *_common(tmp_path / "s")])
    model = student.model
    assert torch.equal(next(model.teacher.parameters()), next(teacher.model.generator.parameters()))
    assert model.compression_ratio == pytest.approx(337_281 / 6_573)
    assert count_parameters(model.generator) == count_parameters(DCGANGenerator(16, 1, 100, 2))
    assert student.trainer.global_step == 1  # MSE mode: one student step per batch
