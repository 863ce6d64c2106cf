"""Acceptance: every vision DataModule trains a Classifier for one step through the CLI on tiny real-format files."""

import pytest

from lightning_robust.cli import LightningRobustCLI
from lightning_robust.datamodules import DatasetNotFoundError
from tests.helpers.vision_data import write_celeba, write_cifar, write_mnist, write_mnist_m, write_visda


def _cifar(tmp):
    info = write_cifar(tmp)
    return "CIFAR10DataModule", [f"--data.init_args.checksums={info['manifest']}"], (3, 32, 10), 90


def _mnist(tmp):
    info = write_mnist(tmp / "MNIST" / "raw")
    return "MNISTDataModule", [f"--data.init_args.checksums={info['manifest']}"], (1, 28, 10), 36


def _celeba(tmp):
    info = write_celeba(tmp)
    args = [f"--data.init_args.checksums={info['manifest']}", "--data.init_args.target=Male",
            "--data.init_args.image_size=32", "--data.init_args.crop_size=30"]
    return "CelebADataModule", args, (3, 32, 2), 12


def _visda(tmp):
    write_visda(tmp, manifest=True)
    args = ["--data.init_args.image_size=32", "--data.init_args.classes=[car, truck, aeroplane]"]
    return "VisDADataModule", args, (3, 32, 3), 5


def _mnist_m(tmp):
    write_mnist_m(tmp, manifest=True)
    return "MNISTMDataModule", [], (3, 28, 10), 27


@pytest.mark.slow
@pytest.mark.parametrize("make", [_cifar, _mnist, _celeba, _visda, _mnist_m], ids=lambda f: f.__name__[1:])
def test_fit_one_step_through_cli(tmp_path, make):
    data = tmp_path / "data"
    name, data_args, (channels, size, classes), n_train = make(data)
    args = [
        "fit",
        "--model=lightning_robust.models.Classifier",
        "--model.init_args.net=lightning_robust.nets.SmallCNN",
        f"--model.init_args.net.init_args.in_channels={channels}",
        f"--model.init_args.net.init_args.input_size={size}",
        f"--model.init_args.net.init_args.num_classes={classes}",
        f"--data=lightning_robust.datamodules.{name}",
        f"--data.init_args.root={data}",
        "--data.init_args.batch_size=4",
        "--trainer.fast_dev_run=1",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path / 'runs'}",
        *data_args,
    ]
    cli = LightningRobustCLI(args=args)
    assert cli.trainer.global_step == 1
    dm = cli.datamodule
    assert type(dm).__name__ == name and dm.input_shape == (channels, size, size) and dm.num_classes == classes
    assert len(dm.train_dataset) == n_train
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (channels, size, size) and int(y.max()) < classes
    assert float(cli.trainer.callback_metrics["train/loss"]) > 0


def test_cli_reports_bad_argument_and_missing_data(tmp_path, capsys):
    base = ["fit", "--model=lightning_robust.models.Classifier", "--model.init_args.net=lightning_robust.nets.SmallCNN",
            "--data=lightning_robust.datamodules.CIFAR10DataModule", f"--data.init_args.root={tmp_path}",
            "--trainer.fast_dev_run=1", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}"]
    with pytest.raises(SystemExit):
        LightningRobustCLI(args=[*base, "--data.init_args.channels=2"])
    assert "channels must be one of ['1', '3'], got 2" in capsys.readouterr().err
    with pytest.raises(DatasetNotFoundError, match=r"(?s)CIFAR-10 train batches not found under .*Expected layout"):
        LightningRobustCLI(args=base)
