"""CelebADataModule against torchvision's CelebA on the same files; targets; crop/resize; integrity errors."""

import shutil
import zipfile

import pytest
import torch
import torchvision
from torchvision import transforms

from lightning_robust.datamodules import CelebADataModule, DataIntegrityError, DatasetNotFoundError
from lightning_robust.datamodules.integrity import md5sum
from tests.helpers.vision_data import flip_byte, truncate, write_celeba


@pytest.fixture
def celeba(tmp_path):
    return write_celeba(tmp_path)


def _dm(info, **kw):
    kw.setdefault("image_size", 16)
    kw.setdefault("crop_size", 30)
    return CelebADataModule(str(info["folder"].parent), checksums=str(info["manifest"]), **kw)


def _torchvision_reference(folder, split, target_type, transform):
    class TinyCelebA(torchvision.datasets.CelebA):
        file_list = [(fid, md5sum(folder / name) if (folder / name).is_file() else md5, name)  # noqa: RUF012
                     for fid, md5, name in torchvision.datasets.CelebA.file_list]

    return TinyCelebA(str(folder.parent), split=split, target_type=target_type, transform=transform)


def test_matches_torchvision_celeba(celeba):
    dm = _dm(celeba, target="attr")
    dm.setup()
    tf = transforms.Compose([transforms.CenterCrop(30), transforms.Resize((16, 16)), transforms.ToTensor()])
    for split, ds in (("train", dm.train_dataset), ("valid", dm.val_dataset), ("test", dm.test_dataset)):
        ref = _torchvision_reference(celeba["folder"], split, "attr", tf)
        assert len(ref) == len(ds)
        for i in range(len(ds)):
            x, y = ds[i]
            rx, ry = ref[i]
            assert torch.equal(x, rx) and torch.equal(y, ry.long())
    assert dm.attr_names == celeba["attr_names"] and dm.num_classes == 40
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (12, 6, 6)


def test_identity_and_single_attribute_targets(celeba):
    dm = _dm(celeba, target="identity")
    dm.setup("test")
    ref = _torchvision_reference(celeba["folder"], "test", "identity", None)
    assert [dm.test_dataset[i][1] for i in range(len(ref))] == [int(ref[i][1]) - 1 for i in range(len(ref))]
    male = _dm(celeba, target="Male", official_val=False, val_fraction=0.0, class_proportions=[0.75, 0.25])
    male.setup()
    y = torch.tensor([male.train_dataset[i][1] for i in range(len(male.train_dataset))])
    # 12 training faces, 6 per class: N = min(6/0.75, 6/0.25) = 8 -> 6 without, 2 with the attribute.
    assert torch.bincount(y).tolist() == [6, 2]
    assert male.num_classes == 2 and male.class_names == ["not Male", "Male"] and male.val_dataset is None


def test_gan_defaults_and_flip(celeba):
    dm = _dm(celeba, target="none", augment=True, channels=1, batch_size=12, official_val=False, val_fraction=0.0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (12, 1, 16, 16) and torch.equal(y, torch.zeros(12, dtype=torch.long))
    # The training view flips some images (the eval view is deterministic).
    base = dm.train_dataset.dataset.with_transform(dm._transform(train=False))
    flips = 0
    for i in range(12):
        a, b = dm.train_dataset[i][0], base[dm.train_dataset.indices[i]][0]
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
        flips += int(not torch.equal(a, b))
    assert 0 < flips < 12
    full = CelebADataModule(str(celeba["folder"].parent), checksums=str(celeba["manifest"]))
    assert full.image_size == 64 and full.crop_size == 178


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target": "Smilling"}, "target must be 'attr', 'identity', 'none' or one of CelebA's 40 attributes"),
    ({"classes": [0, 1]}, "classes needs class targets"),
    ({"target": "Male", "class_proportions": [1.0]}, r"one entry per kept class \(2\)"),
    ({"crop_size": 0}, "crop_size must be a positive integer"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CelebADataModule(**kwargs)


def test_corrupt_image_is_named_at_read_time_also_in_workers(celeba):
    victim = celeba["folder"] / "img_align_celeba" / celeba["names"][1]
    truncate(victim, 0.5)
    dm = CelebADataModule(str(celeba["folder"].parent), verify=False, image_size=16, crop_size=30, num_workers=1,
                          persistent_workers=False, batch_size=4, official_val=False, val_fraction=0.0)
    dm.setup("fit")
    with pytest.raises(DataIntegrityError, match=rf"{victim.name}: cannot decode the image"):
        for _ in dm.train_dataloader():
            pass
    # With the manifest listing the images, the damage is caught before any training starts.
    with pytest.raises(DataIntegrityError, match=rf"{victim.name}: checksum mismatch"):
        _dm(celeba).setup()


def test_annotation_damage_and_missing_images(celeba):
    attr = celeba["folder"] / "list_attr_celeba.txt"
    flip_byte(attr, len(attr.read_bytes()) - 3)
    with pytest.raises(DataIntegrityError, match=r"list_attr_celeba.txt: checksum mismatch"):
        _dm(celeba).setup()
    with pytest.raises(DataIntegrityError, match=r"list_attr_celeba.txt: not UTF-8 text"):
        _dm(celeba, verify=False).setup()
    write_celeba(celeba["folder"].parent, manifest=False)
    attr.write_text(attr.read_text().replace(" -1", " -7", 1))
    with pytest.raises(DataIntegrityError, match=r"list_attr_celeba.txt, line 3: expected a file name and 4 values"):
        _dm(celeba, verify=False).setup()
    write_celeba(celeba["folder"].parent, manifest=False)
    (celeba["folder"] / "img_align_celeba" / celeba["names"][5]).unlink()
    with pytest.raises(DatasetNotFoundError, match=r"CelebA images \(1 listed in list_eval_partition.txt but absent\)"
                       rf".*{celeba['names'][5]}"):
        _dm(celeba, verify=False).setup()


def test_empty_folder_names_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        CelebADataModule(str(tmp_path)).setup()
    msg = str(err.value)
    assert "img_align_celeba/" in msg and "list_attr_celeba.txt" in msg and "Expected layout:" in msg


def test_zip_is_extracted_once(celeba):
    folder = celeba["folder"]
    with zipfile.ZipFile(folder / "img_align_celeba.zip", "w") as zf:
        for p in sorted((folder / "img_align_celeba").iterdir()):
            zf.write(p, f"img_align_celeba/{p.name}")
    shutil.rmtree(folder / "img_align_celeba")
    dm = CelebADataModule(str(folder.parent), verify=False, image_size=16, crop_size=30)
    dm.setup("test")
    assert len(dm.test_dataset) == 6 and (folder / "img_align_celeba" / celeba["names"][0]).is_file()
