"""MNISTDataModule: IDX layouts against torchvision's reader, the real MNIST test set, integrity errors."""

import gzip

import numpy as np
import pytest
import torch
from torchvision.datasets.mnist import read_image_file, read_label_file

from lightning_robust.datamodules import DataIntegrityError, DatasetNotFoundError, MNISTDataModule, read_mnist
from lightning_robust.datamodules.formats import read_idx
from tests.helpers.vision_data import flip_byte, idx_bytes, truncate, write_mnist

# Published class counts of the MNIST test (t10k) and training sets.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.mark.parametrize(("layout", "gz"), [("MNIST/raw", True), ("", True), ("raw", False)])
def test_layouts_match_torchvision_reader(tmp_path, layout, gz):
    folder = tmp_path / layout if layout else tmp_path
    info = write_mnist(folder, gz=gz)
    dm = MNISTDataModule(str(tmp_path), checksums=str(info["manifest"]), val_fraction=0.25, seed=2)
    dm.setup()
    # Reference: torchvision's IDX readers on uncompressed copies.
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "x").write_bytes(idx_bytes(info["train_x"]))
    (ref / "y").write_bytes(idx_bytes(info["train_y"]))
    rx, ry = read_image_file(str(ref / "x")), read_label_file(str(ref / "y"))
    idx = torch.tensor(dm.train_dataset.indices)
    x = torch.stack([dm.train_dataset[i][0] for i in range(len(dm.train_dataset))])
    y = torch.tensor([dm.train_dataset[i][1] for i in range(len(dm.train_dataset))])
    assert torch.equal(x[:, 0], rx[idx].float() / 255) and torch.equal(y, ry[idx].long())
    assert len(dm.val_dataset) == 10 and len(dm.test_dataset) == 30
    assert len(dm.checked_files) == 4


def test_three_channels_resize_and_augment(tmp_path):
    info = write_mnist(tmp_path)
    dm = MNISTDataModule(str(tmp_path), checksums=str(info["manifest"]), channels=3, image_size=32, augment=True,
                         batch_size=8)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])
    tx = dm.test_dataset[0][0]
    assert tx.shape == (3, 32, 32) and float(tx.min()) >= 0 and float(tx.max()) <= 1
    assert dm.input_shape == (3, 32, 32)


def test_stage_aware_setup_reads_only_what_it_needs(tmp_path):
    info = write_mnist(tmp_path, splits=("test",))
    dm = MNISTDataModule(str(tmp_path), checksums=str(info["manifest"]))
    dm.setup("test")
    assert len(dm.test_dataset) == 30 and dm.train_dataset is None
    with pytest.raises(DatasetNotFoundError, match=r"MNIST train files not found .*train-images-idx3-ubyte\[\.gz\]"):
        dm.setup("fit")


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_damaged_gz_is_named(tmp_path, damage):
    info = write_mnist(tmp_path)
    damage(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DataIntegrityError, match=r"t10k-images-idx3-ubyte.gz: checksum mismatch"):
        MNISTDataModule(str(tmp_path), checksums=str(info["manifest"])).setup("test")
    # Without checksums the structure check still names the file.
    with pytest.raises(DataIntegrityError, match=r"t10k-images-idx3-ubyte.gz: (cannot decompress|the IDX header)"):
        MNISTDataModule(str(tmp_path), verify=False).setup("test")


def test_structural_errors_without_checksums(tmp_path):
    write_mnist(tmp_path, gz=False, manifest=False)
    truncate(tmp_path / "train-images-idx3-ubyte", 0.7)
    with pytest.raises(DataIntegrityError, match=r"train-images-idx3-ubyte: the IDX header declares 40 x 28 x 28"):
        MNISTDataModule(str(tmp_path), verify=False).setup("fit")
    write_mnist(tmp_path, gz=False, manifest=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(29, np.uint8)))
    with pytest.raises(DataIntegrityError, match=r"holds 30 images but .*t10k-labels-idx1-ubyte holds 29 labels"):
        MNISTDataModule(str(tmp_path), verify=False).setup("test")
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(30, 12, np.uint8)))
    with pytest.raises(DataIntegrityError, match=r"labels must lie in 0..9, found 12"):
        MNISTDataModule(str(tmp_path), verify=False).setup("test")


def test_empty_folder_and_official_checksums(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        MNISTDataModule(str(tmp_path)).setup()
    assert "Expected layout:" in str(err.value) and "MNIST/raw/train-images-idx3-ubyte[.gz]" in str(err.value)
    write_mnist(tmp_path, manifest=False)
    with pytest.raises(DataIntegrityError, match=r"train-images-idx3-ubyte.gz: checksum mismatch .*expected "
                       r"f68b3c2dcbeaaa9fbdd348bbdeb94873, official"):
        MNISTDataModule(str(tmp_path)).setup()


@pytest.mark.data
def test_real_mnist_test_set(shared_data, tmp_path):
    raw = shared_data / "MNIST" / "raw"
    # Independent count: the label file parsed by hand (8-byte header, then one byte per label).
    label_bytes = gzip.decompress((raw / "t10k-labels-idx1-ubyte.gz").read_bytes())
    by_hand = np.bincount(np.frombuffer(label_bytes, np.uint8, offset=8), minlength=10).tolist()
    assert by_hand == MNIST_TEST_COUNTS

    dm = MNISTDataModule(str(shared_data), batch_size=1000)  # torchvision's MNIST/raw layout, official MD5s
    dm.setup("test")
    assert len(dm.test_dataset) == 10_000
    assert {p.name for p in dm.checked_files} == {"t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
    ys = torch.cat([y for _, y in dm.test_dataloader()])
    assert torch.bincount(ys, minlength=10).tolist() == MNIST_TEST_COUNTS

    # Images equal torchvision's reader on a decompressed copy.
    x, _ = read_mnist(raw, "test")
    (tmp_path / "x").write_bytes(gzip.decompress((raw / "t10k-images-idx3-ubyte.gz").read_bytes()))
    assert np.array_equal(x, read_image_file(str(tmp_path / "x")).numpy()) and x.shape == (10_000, 28, 28)
    assert np.array_equal(dm.test_dataset.images[:, 0].numpy(), x)
    # The real training labels (the images are not in the shared folder).
    train_labels = read_idx(raw / "train-labels-idx1-ubyte.gz")
    assert np.bincount(train_labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    with pytest.raises(DatasetNotFoundError, match="MNIST train files not found"):
        dm.setup("fit")
