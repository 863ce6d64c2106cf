"""The nine loader settings live in one typed place (LoaderOptions) and are keyword-only everywhere."""

import typing

import pytest
from jsonargparse import ArgumentParser

from lightning_robust.datamodules import (
    CIFAR10DataModule,
    ColoredDigitsDataModule,
    DigitsDataModule,
    GaussianMixtureDataModule,
    IMDBDataModule,
    LoaderOptions,
    MNISTDataModule,
    RobustDataModule,
)
from lightning_robust.datamodules.base import LOADER_DEFAULTS

NINE = {"batch_size": 7, "eval_batch_size": 5, "num_workers": 0, "persistent_workers": False, "pin_memory": True,
        "val_fraction": 0.25, "seed": 3, "with_index": True, "drop_last": True}


def test_loader_options_is_the_single_typed_list():
    assert set(typing.get_type_hints(LoaderOptions)) == set(NINE) == set(LOADER_DEFAULTS)


@pytest.mark.parametrize("cls", [DigitsDataModule, ColoredDigitsDataModule, GaussianMixtureDataModule,
                                 MNISTDataModule, CIFAR10DataModule, IMDBDataModule])
def test_every_setting_reaches_the_base(cls):
    dm = cls(**NINE)
    assert dm.loader_options == NINE


def test_per_class_defaults_and_keyword_only():
    assert DigitsDataModule().batch_size == 128
    assert ColoredDigitsDataModule().batch_size == 64
    assert GaussianMixtureDataModule().batch_size == 256
    assert IMDBDataModule().batch_size == 32
    with pytest.raises(TypeError):
        DigitsDataModule(8, 1, 0.2, None, 64)  # type: ignore[call-arg]  # the loader settings are keyword-only
    with pytest.raises(TypeError, match="batchsize"):
        DigitsDataModule(batchsize=3)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="batch_size"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ValueError, match="seed"):
        RobustDataModule(seed=-1)


def test_cli_parser_sees_each_setting_by_name():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DigitsDataModule, "data")
    cfg = parser.parse_args(["--data.batch_size=9", "--data.with_index=true", "--data.image_size=16"])
    dm = DigitsDataModule(**{k: v for k, v in vars(cfg.data).items() if v is not None})
    assert (dm.batch_size, dm.with_index, dm.image_size) == (9, True, 16)
    with pytest.raises(Exception, match="batch_size"):
        parser.parse_args(["--data.batch_size=many"])
