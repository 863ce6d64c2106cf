"""The entropic-GAN configs parse; the CPU-scale one runs a fast_dev_run."""

from pathlib import Path

import yaml

import lightning_robust.datamodules as dms
from lightning_robust.cli import LightningRobustCLI

REPO = Path(__file__).resolve().parents[1]


def test_mixture_config_fast_dev_run(tmp_path):
    cli = LightningRobustCLI(args=["fit", "--config", str(REPO / "configs" / "entropic_gan_mixture.yaml"),
                                   "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                                   "--trainer.enable_progress_bar=false"])
    assert type(cli.model).__name__ == "EntropicGAN" and cli.model.cost == "l2" and cli.model.reg == 0.1
    assert int(cli.model.gan_step) == 1 and "val/log_likelihood" in cli.trainer.callback_metrics


def test_paper_scale_mnist_config_model_runs_on_28px_digits(tmp_path):
    # The paper-scale model and optimizers, on the bundled digits upsampled to 28x28 for one batch.
    cfg = yaml.safe_load((REPO / "configs" / "entropic_gan_mnist.yaml").read_text())
    cfg["data"] = {"class_path": "lightning_robust.datamodules.DigitsDataModule",
                   "init_args": {"image_size": 28, "batch_size": 16}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    cli = LightningRobustCLI(args=["fit", "--config", str(tmp_path / "c.yaml"), "--trainer.fast_dev_run=true",
                                   f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                                   "--model.init_args.likelihood_latents=64"])
    model = cli.model
    assert model.cost == "l1" and model.reg == 5.0 and model.n_critic == 5 and model.latent_dim == 128
    assert model.current_reg() == 10.0  # 2λ during the warm-up
    assert model.critics.trunk is not None and model.critics.real.bias is None
    assert int(model.gan_step) == 1


def test_paper_scale_mnist_config_parses_with_mnist(tmp_path):
    assert hasattr(dms, "MNISTDataModule")
    # run=False: no subcommand, the config is parsed and the classes are built without fitting.
    cli = LightningRobustCLI(args=["--config", str(REPO / "configs" / "entropic_gan_mnist.yaml"),
                                   f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert type(cli.datamodule).__name__ == "MNISTDataModule" and cli.trainer.max_steps == 60000
