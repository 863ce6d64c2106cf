"""The poison-filter configs parse; the CPU-scale one runs a fast_dev_run end to end."""

import json
from pathlib import Path

import pytest
import torch

from lightning_robust.cli import LightningRobustCLI
from lightning_robust.nets import SmallCNN

REPO = Path(__file__).resolve().parents[1]


def test_digits_config_fast_dev_run(tmp_path):
    ckpt = tmp_path / "clean.ckpt"
    torch.manual_seed(0)
    torch.save({"state_dict": {f"net.{k}": v for k, v in SmallCNN(input_size=8).state_dict().items()}}, ckpt)
    cli = LightningRobustCLI(args=[
        "fit", "--config", str(REPO / "configs" / "poison_filter_digits.yaml"), "--trainer.fast_dev_run=true",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        f"--model.init_args.net.init_args.checkpoint={ckpt}", f"--data.init_args.feature_checkpoint={ckpt}",
        "--data.init_args.attack.init_args.steps=2",
    ])
    dm = cli.datamodule
    assert type(dm).__name__ == "PoisonedDataModule" and len(dm.poison_indices) == 5
    assert len(dm.train_dataset) == 500 and cli.trainer.global_step == 1
    filt = next(c for c in cli.trainer.callbacks if type(c).__name__ == "DeepKNNPoisonFilter")
    assert filt.k_used == 50 and filt.removed_indices is not None
    assert set(dm.excluded_train_indices) == set(filt.removed_indices)
    report = json.loads(filt.output_path(cli.trainer).read_text())
    assert report["removed_indices"] == filt.removed_indices and "detection_rate" in report["detection"]
    # Only the head is trainable.
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert trainable == {"net.net.classifier.4.weight", "net.net.classifier.4.bias"}


def test_cifar10_config_parses(tmp_path):
    try:
        from lightning_robust.datamodules import CIFAR10DataModule  # noqa: F401
    except ImportError:
        pytest.skip("CIFAR10DataModule is not on this branch yet (written in another issue); "
                    "the integrator removes this skip on merge")
    cli = LightningRobustCLI(run=False, args=[
        "fit", "--config", str(REPO / "configs" / "poison_filter_cifar10.yaml"), "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
        "--model.init_args.net.init_args.checkpoint=null", "--data.init_args.feature_checkpoint=null",
    ])
    assert type(cli.datamodule).__name__ == "PoisonedDataModule"
    assert type(cli.datamodule.datamodule).__name__ == "CIFAR10DataModule"
    assert cli.datamodule.examples_per_class == 50 and cli.datamodule.attack.steps == 4000
    assert cli.datamodule.datamodule.augment is False
