"""CIFAR10DataModule against torchvision's CIFAR10 on the same files; augmentation; subsets; integrity errors."""

import shutil

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.transforms import functional as TF

from lightning_robust.datamodules import (
    CIFAR10DataModule,
    DataIntegrityError,
    DatasetNotFoundError,
    proportional_subsample,
    random_crop_flip,
)
from lightning_robust.datamodules.image_datasets import resize_uint8, rgb_to_grey_uint8
from lightning_robust.datamodules.integrity import md5sum
from tests.helpers.vision_data import flip_byte, truncate, write_cifar


@pytest.fixture
def cifar(tmp_path):
    return write_cifar(tmp_path)


def _torchvision_reference(folder, train):
    """torchvision's CIFAR10 reading our files (its MD5 table pointed at the tiny files)."""

    class TinyCIFAR10(torchvision.datasets.CIFAR10):
        train_list = [[f"data_batch_{i}", md5sum(folder / f"data_batch_{i}")] for i in range(1, 6)]  # noqa: RUF012
        test_list = [["test_batch", md5sum(folder / "test_batch")]]  # noqa: RUF012
        meta = {"filename": "batches.meta", "key": "label_names", "md5": md5sum(folder / "batches.meta")}  # noqa: RUF012

    return TinyCIFAR10(str(folder.parent), train=train, transform=TF.to_tensor)


def _stack(ds):
    xs, ys = zip(*(ds[i][:2] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def test_matches_torchvision_reader(cifar):
    dm = CIFAR10DataModule(str(cifar["folder"].parent), checksums=str(cifar["manifest"]), augment=False,
                           val_fraction=0.2, seed=5)
    dm.setup()
    ref_train, ref_test = _torchvision_reference(cifar["folder"], True), _torchvision_reference(cifar["folder"], False)
    rx, ry = _stack(ref_train)
    idx = torch.tensor(dm.train_dataset.indices)
    x, y = _stack(dm.train_dataset)
    assert torch.equal(x, rx[idx]) and torch.equal(y, ry[idx])
    vx, _ = _stack(dm.val_dataset)
    assert torch.equal(vx, rx[torch.tensor(dm.val_dataset.indices)])
    assert sorted(dm.train_dataset.indices + dm.val_dataset.indices) == list(range(100))
    tx, ty = _stack(dm.test_dataset)
    rtx, rty = _stack(ref_test)
    assert torch.equal(tx, rtx) and torch.equal(ty, rty)
    assert ref_train.classes == dm.class_names
    # Every checked file came from the manifest.
    assert len(dm.checked_files) == 7 and all(p.parent == cifar["folder"] for p in dm.checked_files)


def test_grey_and_resized_match_pil(cifar):
    dm = CIFAR10DataModule(str(cifar["folder"]), checksums=str(cifar["manifest"]), augment=False, channels=1,
                           val_fraction=0.0)
    dm.setup("test")
    ref = _torchvision_reference(cifar["folder"], False)
    for i in range(5):
        pil = Image.fromarray(ref.data[i]).convert("L")
        assert torch.equal(dm.test_dataset[i][0], TF.to_tensor(pil))
    x = torch.from_numpy(cifar["test_x"][:4])
    assert torch.equal(rgb_to_grey_uint8(x)[:, 0], torch.from_numpy(np.stack(
        [np.asarray(Image.fromarray(a.transpose(1, 2, 0)).convert("L")) for a in cifar["test_x"][:4]])))
    # Resizing: torchvision's antialiased bilinear resize of uint8 tensors, to within rounding.
    ref16 = TF.resize(x, [16, 16], antialias=True)
    assert (resize_uint8(x, 16).int() - ref16.int()).abs().max() <= 1
    dm16 = CIFAR10DataModule(str(cifar["folder"]), checksums=str(cifar["manifest"]), image_size=16)
    dm16.setup("test")
    assert dm16.test_dataset[0][0].shape == (3, 16, 16) and dm16.input_shape == (3, 16, 16)


def _candidates(img, pad):
    """All images torchvision's RandomCrop(padding=pad) + RandomHorizontalFlip can produce (brute force)."""
    H, W = img.shape[-2:]
    padded = TF.pad(img, [pad])
    out = {}
    for i in range(2 * pad + 1):
        for j in range(2 * pad + 1):
            crop = TF.crop(padded, i, j, H, W)
            out[crop.numpy().tobytes()] = (i, j, False)
            out[TF.hflip(crop).numpy().tobytes()] = (i, j, True)
    return out


def test_random_crop_flip_matches_torchvision_distribution():
    # Distinct non-zero pixel values make the crop offset and flip identifiable from the output.
    img = (torch.arange(1, 3 * 10 * 10 + 1, dtype=torch.int32)).view(1, 3, 10, 10)
    cand = _candidates(img[0], 2)
    n = 5000
    out = random_crop_flip(img.expand(n, -1, -1, -1), pad=2, flip=True, generator=torch.Generator().manual_seed(0))
    seen = [cand[o.numpy().tobytes()] for o in out]  # KeyError = an output torchvision could not produce
    offsets = np.zeros((5, 5))
    for i, j, _ in seen:
        offsets[i, j] += 1
    flips = sum(f for *_, f in seen)
    # Uniform over 25 offsets (expected 200, sd ~14) and fair flips (expected 2500, sd ~35); 5-sigma bounds.
    assert offsets.min() > 200 - 70 and offsets.max() < 200 + 70
    assert abs(flips - n / 2) < 5 * 35


def test_train_loader_augments_val_and_test_do_not(cifar):
    dm = CIFAR10DataModule(str(cifar["folder"].parent), checksums=str(cifar["manifest"]), batch_size=16,
                           with_index=True, seed=1)
    dm.setup()
    plain = torch.from_numpy(cifar["train_x"])
    changed, n = 0, 0
    for x, _y, idx in list(dm.train_dataloader())[:3]:
        n += len(idx)
        for k in range(len(idx)):
            src = plain[dm.train_dataset.indices[int(idx[k])]].float() / 255
            cand = _candidates(src, 4)
            assert x[k].numpy().tobytes() in cand
            changed += int(not torch.equal(x[k], src))
    assert changed > 0.8 * n  # 1 in 162 draws is the identity
    vx, _, vidx = next(iter(dm.val_dataloader()))
    assert torch.equal(vx[0], plain[dm.val_dataset.indices[int(vidx[0])]].float() / 255)


def test_with_index_and_exclusion_follow_the_poison_filter_contract(cifar):
    dm = CIFAR10DataModule(str(cifar["folder"].parent), checksums=str(cifar["manifest"]), batch_size=7,
                           with_index=True, augment=False, val_fraction=0.0)
    dm.setup()
    dm.exclude_train_indices([3, 50, 99])
    seen = []
    for x, y, idx in dm.train_dataloader():
        for k in range(len(idx)):
            ref_x, ref_y = dm.train_dataset[int(idx[k])]
            assert torch.equal(x[k], ref_x) and int(y[k]) == ref_y
        seen += idx.tolist()
    assert sorted(seen) == sorted(set(range(100)) - {3, 50, 99})


def test_proportional_subsample_is_maximal_and_deterministic():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        K = 4
        labels = torch.randint(0, K, (int(torch.randint(50, 300, (1,), generator=g)),), generator=g)
        p = torch.rand(K, generator=g) + 0.05
        p = (p / p.sum()).tolist()
        keep = proportional_subsample(labels, p, seed=trial)
        counts = torch.bincount(labels, minlength=K).double()
        kept = torch.bincount(labels[keep], minlength=K)
        # Brute force: the largest real total N with floor(p_k N) <= n_k is min_k n_k / p_k.
        total = min(float(counts[k]) / p[k] for k in range(K))
        assert kept.tolist() == [int(np.floor(p[k] * total + 1e-9)) for k in range(K)]
        assert any(int(kept[k]) == int(counts[k]) for k in range(K))  # the limiting class is kept whole
        assert torch.equal(keep, proportional_subsample(labels, p, seed=trial))
        assert torch.equal(keep, keep.unique())


def test_classes_by_name_and_proportions(cifar):
    dm = CIFAR10DataModule(str(cifar["folder"].parent), checksums=str(cifar["manifest"]), classes=["cat", "dog"],
                           class_proportions=[0.75, 0.25], val_fraction=0.0, test_proportions=False)
    dm.setup()
    y = torch.tensor([dm.train_dataset[i][1] for i in range(len(dm.train_dataset))])
    # 10 cats and 10 dogs in the tiny set: N = min(10/0.75, 10/0.25) = 13.3 -> 10 cats, 3 dogs.
    assert torch.bincount(y).tolist() == [10, 3]
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    ty = torch.tensor([dm.test_dataset[i][1] for i in range(len(dm.test_dataset))])
    raw = torch.tensor(cifar["test_y"])
    assert torch.bincount(ty).tolist() == [int((raw == 3).sum()), int((raw == 5).sum())]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channels": 2}, "channels must be one of"),
        ({"classes": ["cat", "zebra"]}, "classes must be distinct indices in 0..9 or names among"),
        ({"classes": [1, 1]}, "classes must be a non-empty list of distinct classes"),
        ({"class_proportions": [0.5, 0.5]}, r"class_proportions must have one entry per kept class \(10\)"),
        ({"class_proportions": [0.5, 0.6] + [0.0] * 8}, "class_proportions must sum to one"),
        ({"image_size": 2}, "image_size must be an integer >= 4"),
        ({"root": ""}, "root must be a folder path"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(**kwargs)


def test_empty_folder_names_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        CIFAR10DataModule(str(tmp_path)).setup()
    msg = str(err.value)
    assert "CIFAR-10 train batches not found under" in msg and "cifar-10-batches-py/data_batch_1" in msg
    assert "Expected layout:" in msg and "cifar-10-python.tar.gz" in msg and "download=True" in msg


def test_missing_batch_is_named(cifar):
    (cifar["folder"] / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"missing .*cifar-10-batches-py/data_batch_3\."):
        CIFAR10DataModule(str(cifar["folder"].parent), checksums=str(cifar["manifest"])).setup()


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_damaged_batch_is_named(cifar, damage):
    damage(cifar["folder"] / "data_batch_4")
    with pytest.raises(DataIntegrityError, match=r"cifar-10-batches-py/data_batch_4: checksum mismatch"):
        CIFAR10DataModule(str(cifar["folder"].parent), checksums=str(cifar["manifest"])).setup()


def test_structural_checks_without_checksums(cifar):
    root = str(cifar["folder"].parent)
    truncate(cifar["folder"] / "data_batch_2")
    with pytest.raises(DataIntegrityError, match=r"data_batch_2: cannot unpickle the CIFAR batch"):
        CIFAR10DataModule(root, verify=False).setup()
    write_cifar(cifar["folder"].parent, manifest=False)
    flip_byte(cifar["folder"] / "test_batch", 0)  # the pickle's PROTO opcode
    with pytest.raises(DataIntegrityError, match=r"test_batch: cannot unpickle the CIFAR batch"):
        CIFAR10DataModule(root, verify=False).setup("test")


def test_official_checksums_apply_by_default(cifar):
    # The tiny files carry official names: without a manifest they are held to the official MD5s.
    with pytest.raises(DataIntegrityError, match=r"data_batch_1: checksum mismatch .*expected "
                       r"c99cafc152244af753f735de768cd75f, official checksum"):
        CIFAR10DataModule(str(cifar["folder"].parent)).setup()


def test_archive_is_verified_and_extracted_once(tmp_path):
    info = write_cifar(tmp_path, archive=True)
    shutil.rmtree(info["folder"])
    dm = CIFAR10DataModule(str(tmp_path), checksums=str(info["manifest"]))
    dm.setup("test")
    assert (info["folder"] / "test_batch").is_file() and len(dm.test_dataset) == 30
    assert (tmp_path / "cifar-10-python.tar.gz").absolute() in dm.checked_files
    shutil.rmtree(info["folder"])
    flip_byte(tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(DataIntegrityError, match=r"cifar-10-python.tar.gz: checksum mismatch"):
        CIFAR10DataModule(str(tmp_path), checksums=str(info["manifest"])).setup()
    assert not info["folder"].exists()
