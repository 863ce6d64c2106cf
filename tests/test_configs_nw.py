"""The NW configs: every one parses into the intended classes; the CPU-scale ones run a fast_dev_run."""

from pathlib import Path

import pytest
import torch

from lightning_robust.cli import LightningRobustCLI
from lightning_robust.datamodules import DomainAdaptationDataModule, GaussianMixtureDataModule
from lightning_robust.models import NWGAN, NWDomainAdaptation

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
COMMON = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false"]  # default logger on: hparams merge


@pytest.mark.parametrize(("name", "extra"), [
    ("nw_da_mnist_mnistm.yaml", []),
    # No download in tests: a random-weight ResNet-18 stands in for the pretrained ResNet-50.
    ("nw_da_visda.yaml", ["--model.init_args.feature_extractor.init_args.arch=resnet18",
                          "--model.init_args.classifier.init_args.in_features=512",
                          "--model.init_args.critic.init_args.in_features=512",
                          "--trainer.strategy=auto", "--trainer.devices=1", "--trainer.precision=32"]),
])
def test_paper_scale_configs_parse(name, extra, tmp_path):
    config = tmp_path / name
    config.write_text((CONFIGS / name).read_text().replace("weights: DEFAULT", "weights: null"))
    cli = LightningRobustCLI(args=["--config", str(config), *COMMON, *extra,
                                   f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, NWDomainAdaptation) and cli.model.method == "nw"
    assert isinstance(cli.datamodule, DomainAdaptationDataModule) and cli.model.num_classes == 3
    src, tgt = cli.datamodule.source, cli.datamodule.target
    if name == "nw_da_mnist_mnistm.yaml":
        # The authors keep fractions (1.0, 0.5, 0.1) of classes (1, 4, 8) in the source and (0.1, 0.5, 1.0) in
        # the target, so the per-class ratio source/target is (10, 1, 0.1) up to the shared class counts.
        ratio = [s / t for s, t in zip(src.class_proportions, tgt.class_proportions)]
        assert [r / ratio[1] for r in ratio] == pytest.approx([10.0, 1.0, 0.1], rel=0.02)
        assert cli.model.feature_extractor.normalize is not None  # inputs to [-1, 1] as theirs
    else:
        assert src.class_proportions == pytest.approx(tgt.class_proportions[::-1])
    # The authors' critic: weight clipping 0.01, features aligned every 10th batch; class-wise source batches.
    assert cli.model.critic_regularizer == "clip" and cli.model.clip_value == 0.01
    assert cli.model.adversarial_every == 10 and cli.datamodule.classwise_source


def test_cpu_scale_da_config_runs(tmp_path):
    cli = LightningRobustCLI(args=["fit", "--config", str(CONFIGS / "nw_da_digits_cpu.yaml"), *COMMON,
                                   "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.model, NWDomainAdaptation) and int(cli.model.da_step) == 1
    assert float(cli.model.proportions.sum()) == pytest.approx(1.0)


def test_gaussians_nwgan_config_runs(tmp_path):
    cli = LightningRobustCLI(args=["fit", "--config", str(CONFIGS / "nw_gan_gaussians.yaml"), *COMMON,
                                   "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    assert isinstance(cli.model, NWGAN) and isinstance(cli.datamodule, GaussianMixtureDataModule)
    assert cli.model.num_components == 9 and torch.allclose(
        torch.tensor(cli.datamodule.hparams.proportions), torch.tensor([(9 - k) / 45 for k in range(9)]), atol=1e-6)
