"""The poison-filter configs parse; the CPU-scale one runs a fast_dev_run end to end."""

import json
from pathlib import Path

import torch
import yaml

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
    # The checkpoints the paper-scale config points at come from a clean run; drop them for parsing.
    cfg = yaml.safe_load((REPO / "configs" / "poison_filter_cifar10.yaml").read_text())
    cfg["model"]["init_args"]["net"]["init_args"]["checkpoint"] = None
    cfg["data"]["init_args"]["feature_checkpoint"] = None
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    # run=False: no subcommand; the classes are built from the config without fitting.
    cli = LightningRobustCLI(run=False, args=[
        "--config", str(tmp_path / "c.yaml"), "--trainer.fast_dev_run=true",
        "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
    ])
    assert type(cli.datamodule).__name__ == "PoisonedDataModule"
    assert type(cli.datamodule.datamodule).__name__ == "CIFAR10DataModule"
    assert cli.datamodule.examples_per_class == 50 and cli.datamodule.attack.steps == 4000
    assert cli.datamodule.datamodule.augment is False
