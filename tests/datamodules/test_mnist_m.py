"""MNISTMDataModule (distributed layout) and the MNIST-M builder (difference blend over photo patches)."""

import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_robust.datamodules import (
    DataIntegrityError,
    DatasetNotFoundError,
    MNISTMDataModule,
    blend_mnist_m,
    build_mnist_m,
)
from tests.helpers.vision_data import flip_byte, write_mnist, write_mnist_m


def test_reads_distributed_layout(tmp_path):
    info = write_mnist_m(tmp_path)
    dm = MNISTMDataModule(str(tmp_path), val_fraction=0.0)
    dm.setup()
    x = torch.stack([dm.train_dataset[i][0] for i in range(30)])
    ref = torch.from_numpy(info["train_x"]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(x, ref) and [dm.train_dataset[i][1] for i in range(30)] == info["train_y"].tolist()
    assert len(dm.test_dataset) == 20 and dm.checked_files == []  # no manifest: nothing to checksum
    grey = MNISTMDataModule(str(tmp_path / "mnist_m"), channels=1, image_size=32)  # root = the folder itself
    grey.setup("test")
    g = grey.test_dataset[0][0]
    pil = Image.fromarray(info["test_x"][0]).convert("L").resize((32, 32), Image.BILINEAR)
    assert g.shape == (1, 32, 32) and torch.equal(g[0], torch.from_numpy(np.array(pil)).float() / 255)


def _patches_matching(out, digit, bgs):
    """Every (photo, y, x) whose patch difference-blends ``digit`` into ``out`` (brute force)."""
    return [(b, y, x) for b, bg in enumerate(bgs) for y in range(bg.shape[0] - 27) for x in range(bg.shape[1] - 27)
            if np.array_equal(out, np.abs(bg[y:y + 28, x:x + 28].astype(int) - digit[:, :, None].astype(int)))]


def test_blend_is_the_difference_with_some_patch():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    bgs = [rng.integers(0, 256, size=(31, 33, 3), dtype=np.uint8),
           rng.integers(0, 256, size=(29, 30, 3), dtype=np.uint8)]
    out = blend_mnist_m(digits, bgs, np.random.default_rng(1))
    used = set()
    for k in range(len(digits)):
        hits = _patches_matching(out[k], digits[k], bgs)
        assert hits, f"output {k} is not a difference blend of any patch"
        used.add(hits[0])
    # Positions and photos vary: 30 possible (photo, y, x); 40 draws hit about 19 of them.
    assert len(used) > 12 and {u[0] for u in used} == {0, 1}
    # The binarised variant blends 255 * (digit > 0) instead of the grey levels.
    binar = blend_mnist_m(digits, bgs, np.random.default_rng(1), binarize=True)
    for k in range(5):
        assert _patches_matching(binar[k], (digits[k] > 0).astype(np.uint8) * 255, bgs)
    with pytest.raises(ValueError, match=r"backgrounds\[0\] must be a colour image of at least 28x28"):
        blend_mnist_m(digits, [np.zeros((20, 40, 3), np.uint8)], rng)


def test_build_then_read_with_manifest(tmp_path):
    mnist_dir = tmp_path / "mnist"
    mnist = write_mnist(mnist_dir, n_train=12, n_test=8)
    bg_dir = tmp_path / "bsds"
    bg_dir.mkdir()
    rng = np.random.default_rng(3)
    bgs = [rng.integers(0, 256, size=(30, 32, 3), dtype=np.uint8) for _ in range(3)]
    for i, bg in enumerate(bgs):
        Image.fromarray(bg).save(bg_dir / f"{i}.png")
    # The builder verifies MNIST like the DataModule: the tiny files are not the official ones.
    with pytest.raises(DataIntegrityError, match="official checksum"):
        build_mnist_m(mnist_dir, bg_dir, tmp_path / "out")
    folder = build_mnist_m(mnist_dir, bg_dir, tmp_path / "out", seed=5, checksums=str(mnist["manifest"]))
    again = build_mnist_m(mnist_dir, bg_dir, tmp_path / "again", seed=5, checksums=str(mnist["manifest"]))
    assert (folder / "MD5SUMS").read_text() == (again / "MD5SUMS").read_text()  # deterministic
    dm = MNISTMDataModule(str(tmp_path / "out"), val_fraction=0.0)
    dm.setup()
    assert [dm.train_dataset[i][1] for i in range(12)] == mnist["train_y"].tolist()
    assert len(dm.checked_files) == 2 + 12 + 8  # label files and images, from the MD5SUMS manifest
    for k in range(8):
        img = np.asarray(Image.open(folder / "mnist_m_test" / f"{k:08d}.png"))
        assert _patches_matching(img, mnist["test_x"][k], bgs)
    flip_byte(folder / "mnist_m_test" / "00000003.png")
    with pytest.raises(DataIntegrityError, match=r"mnist_m_test/00000003.png: checksum mismatch"):
        MNISTMDataModule(str(tmp_path / "out")).setup("test")


def test_missing_data_and_download_refused(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        MNISTMDataModule(str(tmp_path)).setup()
    msg = str(err.value)
    assert "mnist_m/mnist_m_train_labels.txt" in msg and "build_mnist_m" in msg and "Expected layout:" in msg
    with pytest.raises(ValueError, match="download=True is not available for MNIST-M"):
        MNISTMDataModule(str(tmp_path), download=True)
    info = write_mnist_m(tmp_path)
    (info["folder"] / "mnist_m_train" / "00000007.png").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"images \(1 listed in mnist_m_train_labels.txt but absent\)"):
        MNISTMDataModule(str(tmp_path)).setup("fit")


def test_archive_extracted(tmp_path):
    info = write_mnist_m(tmp_path, n_train=5, n_test=5)
    with tarfile.open(tmp_path / "mnist_m.tar.gz", "w:gz") as tf:
        tf.add(info["folder"], arcname="mnist_m")
    shutil.rmtree(info["folder"])
    dm = MNISTMDataModule(str(tmp_path))
    dm.setup("test")
    assert len(dm.test_dataset) == 5
