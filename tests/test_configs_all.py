"""Every YAML in configs/: each method has a paper-scale and a CPU-scale config, every config parses with the
CLI, and every CPU-scale one trains for a ``fast_dev_run``.

The per-method config tests (tests/test_*config*.py) check each config's hyper-parameters against the paper;
this module checks the whole set in one place, so a config that is added, renamed or broken cannot go unseen.
Paper-scale configs point at data and checkpoints that only exist after a download or an earlier run: the
YAML is patched (no download, no checkpoint, no pretrained weights, one CPU process) before parsing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lightning_robust.cli import LightningRobustCLI
from lightning_robust.nets import SmallCNN, WideResNet

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# method -> (paper-scale configs, CPU-scale configs)
INVENTORY: dict[str, tuple[list[str], list[str]]] = {
    "classifier (quick start), composed objectives": ([], ["objectives_digits", "quickstart"]),
    "attacks + adversarial training (PGD, ReColorAdv 1906.00001)": (
        ["adversarial_training_cifar10"], ["adversarial_training_digits"]),
    "ARD (1905.09747)": (["ard_cifar10"], ["ard_digits"]),
    "Deep k-NN poison filter (1909.13374)": (["poison_filter_cifar10"], ["poison_filter_digits"]),
    "interpretation (1905.12105, 1902.00407)": (["interpretation_mnist"], ["interpretation_digits"]),
    "ReLU certificates (1902.01235)": (["certification_mnist"], ["certification_digits"]),
    "GAN distillation (1902.00159)": (
        ["gan_mnist_teacher", "distilled_gan_mnist", "gan_cifar10_teacher", "distilled_gan_cifar10",
         "gan_celeba_teacher", "distilled_gan_celeba"],
        ["gan_digits_teacher", "distilled_gan_digits"]),
    "Normalized Wasserstein (1902.00415)": (["nw_da_mnist_mnistm", "nw_da_visda"],
                                            ["nw_gan_gaussians", "nw_da_digits_cpu"]),
    "entropic GAN (1810.04147)": (["entropic_gan_mnist"], ["entropic_gan_mixture"]),
    "SPGD text attacks (1905.12864)": (["imdb_spgd"], ["imdb_spgd_cpu"]),
}
PAPER = sorted(n for paper, _ in INVENTORY.values() for n in paper)
CPU = sorted(n for _, cpu in INVENTORY.values() for n in cpu)
TEXT = {"imdb_spgd", "imdb_spgd_cpu"}
_HAS_TEXT = importlib.util.find_spec("transformers") is not None


def _marks(name: str) -> list[Any]:
    return [pytest.mark.text] if name in TEXT else []


def _walk(node: Any, fn: Any) -> None:
    if isinstance(node, dict):
        for key in list(node):
            fn(node, key)
            _walk(node[key], fn)
    elif isinstance(node, list):
        for item in node:
            _walk(item, fn)


def _patched(name: str, tmp_path: Path, devices: int = 1) -> Path:
    """The config with downloads, checkpoints and pretrained weights replaced by offline stand-ins.

    With ``devices > 1`` the config's own strategy is kept (plain ``ddp`` where it says ``auto``), on CPU.
    """
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    trainer = cfg.setdefault("trainer", {})
    strategy = "auto" if devices == 1 else trainer.get("strategy", "auto").replace("auto", "ddp")
    trainer.update(accelerator="cpu", devices=devices, strategy=strategy, default_root_dir=str(tmp_path),
                   enable_progress_bar=False)
    trainer.pop("precision", None)  # 16-mixed is a GPU setting

    def fix(node: dict[str, Any], key: str) -> None:
        if key == "download":
            node[key] = False
        elif key == "weights" and node[key] == "DEFAULT":  # torchvision's pretrained weights: a download
            node[key] = None
        elif key in ("checkpoint", "teacher_checkpoint", "feature_checkpoint"):
            node[key] = None  # random weights stand in for the earlier run's checkpoint
        elif key == "teacher" and isinstance(node[key], str):
            node[key] = str(_teacher_checkpoint(node, tmp_path))
        elif key == "data_dir" and name in TEXT:
            from tests.helpers.imdb import make_imdb_folder

            node[key] = str(make_imdb_folder(tmp_path / "imdb", n_train=6, n_test=3))
            node.update(batch_size=4, limit_train=None, limit_test=None, max_length=32)

    _walk(cfg, fix)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _teacher_checkpoint(model_args: dict[str, Any], tmp_path: Path) -> Path:
    """A weights-only teacher for ARD: the config's teacher_net, a WRN-10-1 standing in for a WRN-34-10."""
    spec = model_args["teacher_net"]
    init = dict(spec.get("init_args", {}))
    if spec["class_path"].endswith("WideResNet"):
        init.update(depth=10, widen_factor=1)
        spec["init_args"] = init
        net: torch.nn.Module = WideResNet(**init)
    else:
        assert spec["class_path"].endswith("SmallCNN"), spec
        net = SmallCNN(**init)
    path = tmp_path / "teacher.pt"
    torch.save(net.state_dict(), path)
    return path


def test_every_method_has_a_paper_and_a_cpu_config_and_every_config_is_listed():
    on_disk = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert sorted(PAPER + CPU) == on_disk
    for method, (paper, cpu) in INVENTORY.items():
        assert cpu, f"{method} has no CPU-scale config"
        assert paper or method.startswith("classifier"), f"{method} has no paper-scale config"


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in PAPER + CPU])
def test_config_parses(name, tmp_path):
    # run=False: no subcommand; the trainer, model and data module are built from the YAML without fitting.
    # Paper-scale configs are built for 4 processes with their own strategy (the processes start only in fit).
    devices = 4 if name in PAPER else 1
    cli = LightningRobustCLI(args=["--config", str(_patched(name, tmp_path, devices))], run=False)
    assert isinstance(cli.model, torch.nn.Module) and cli.datamodule is not None
    assert cli.trainer.max_epochs is not None or cli.trainer.max_steps > 0
    assert cli.trainer.num_devices == devices
    if devices > 1:
        assert "DDP" in type(cli.trainer.strategy).__name__


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in CPU])
def test_cpu_config_fast_dev_run(name, tmp_path):
    if name in TEXT and not _HAS_TEXT:
        pytest.skip("the text extra is not installed")
    cli = LightningRobustCLI(args=["fit", "--config", str(_patched(name, tmp_path)), "--trainer.fast_dev_run=true"])
    assert cli.trainer.state.finished and cli.trainer.global_step >= 1
    loss = {k: v for k, v in cli.trainer.callback_metrics.items() if "loss" in k}
    assert all(torch.isfinite(v).all() for v in loss.values()), loss
