"""Data errors name the way out: verify=False and a checksum manifest for re-packed copies, the really missing
MNIST files with the expected layout as a tree, a readable failed-download message. Tiny files, real formats."""

from __future__ import annotations

import urllib.error

import pytest

from lightning_robust.datamodules import CIFAR10DataModule, MNISTDataModule, write_checksum_manifest
from lightning_robust.datamodules.integrity import DataIntegrityError, DatasetNotFoundError
from lightning_robust.datamodules.mnist import read_mnist
from tests.helpers.vision_data import write_cifar, write_mnist


def test_repacked_cifar_names_verify_false_and_the_manifest_and_both_work(tmp_path) -> None:
    write_cifar(tmp_path, manifest=False)  # our own bytes: the official MD5s cannot match
    with pytest.raises(DataIntegrityError) as exc:
        CIFAR10DataModule(str(tmp_path)).setup("test")
    message = str(exc.value)
    assert "checksum mismatch" in message and "verify=False" in message
    assert f"write_checksum_manifest('{tmp_path}')" in message and f"checksums='{tmp_path}/MD5SUMS'" in message
    # Both ways out do what the message says.
    dm = CIFAR10DataModule(str(tmp_path), verify=False)
    dm.setup("test")
    assert len(dm.test_dataset) == 30
    files = [p.relative_to(tmp_path) for p in sorted((tmp_path / "cifar-10-batches-py").iterdir())]
    write_checksum_manifest(tmp_path, files)
    dm = CIFAR10DataModule(str(tmp_path), checksums=str(tmp_path / "MD5SUMS"))
    dm.setup("test")
    assert len(dm.test_dataset) == 30


def test_mnist_with_some_files_names_the_missing_ones_where_the_others_are(tmp_path) -> None:
    raw = tmp_path / "raw"
    write_mnist(raw, manifest=False, splits=("train",))
    (raw / "train-labels-idx1-ubyte.gz").unlink()  # the images are there, the labels are not
    with pytest.raises(DatasetNotFoundError) as exc:
        MNISTDataModule(str(tmp_path), verify=False).setup("fit")
    message = str(exc.value)
    assert f"missing {raw / 'train-labels-idx1-ubyte[.gz]'}." in message
    assert "train-images-idx3-ubyte[.gz]," not in message.split("Expected layout")[0]  # present: not named
    assert "└── MNIST/" in message and "├── train-images-idx3-ubyte[.gz]" in message  # the layout as a tree
    with pytest.raises(DatasetNotFoundError, match=r"missing .*raw/t10k-images-idx3-ubyte\[\.gz\], .*raw/t10k-lab"):
        read_mnist(tmp_path, "test", verify=False)


def test_empty_folder_names_torchvisions_layout(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError) as exc:
        MNISTDataModule(str(tmp_path)).setup("test")
    assert f"missing {tmp_path / 'MNIST' / 'raw' / 't10k-images-idx3-ubyte[.gz]'}" in str(exc.value)


def test_failed_download_is_a_readable_message(tmp_path, monkeypatch) -> None:
    import torchvision.datasets.utils as tv_utils

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(DatasetNotFoundError) as exc:
        MNISTDataModule(str(tmp_path), download=True).prepare_data()
    message = str(exc.value)
    assert "['" not in message and "']" not in message  # no Python list repr
    lines = message.splitlines()
    assert lines[0].startswith("could not download train-images-idx3-ubyte.gz from any of the")
    tried = [ln for ln in lines if ln.startswith("  - could not download")]
    assert len(tried) >= 2 and all("no network" in ln for ln in tried)
    assert "└── MNIST/" in message
