"""VisDADataModule: image lists, domains, transforms against torchvision, integrity errors."""

import shutil
import tarfile

import pytest
import torch
from PIL import Image
from torchvision import transforms

from lightning_robust.datamodules import DataIntegrityError, DatasetNotFoundError, VisDADataModule
from tests.helpers.vision_data import VISDA_NAMES, flip_byte, truncate, write_visda


@pytest.fixture
def visda(tmp_path):
    info = write_visda(tmp_path, manifest=True)
    info["root"] = tmp_path
    return info


def _labels(ds):
    return [ds[i][1] for i in range(len(ds))]


def test_domains_labels_and_eval_transform(visda):
    dm = VisDADataModule(str(visda["root"]), image_size=16, val_fraction=0.25, seed=3)
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 24 and len(dm.test_dataset) == 24
    assert sorted(_labels(dm.train_dataset) + _labels(dm.val_dataset)) == sorted(visda["train"])
    assert _labels(dm.test_dataset) == visda["validation"] and dm.num_classes == 12
    assert dm.class_names == VISDA_NAMES
    # Evaluation transform: torchvision's Resize(round(16 * 256 / 224)) + CenterCrop(16) on the same file.
    ref_tf = transforms.Compose([transforms.Resize((18, 18)), transforms.CenterCrop(16), transforms.ToTensor()])
    for i in (0, 5, 23):
        path = dm.test_dataset.paths[i]
        assert torch.equal(dm.test_dataset[i][0], ref_tf(Image.open(path).convert("RGB")))
    # Training view: a random 16-px crop of the 18-px resize, maybe flipped.
    x = dm.train_dataset[0][0]
    full = transforms.ToTensor()(transforms.Resize((18, 18))(Image.open(dm.train_dataset.dataset.paths[
        dm.train_dataset.indices[0]]).convert("RGB")))
    crops = [full[:, a:a + 16, b:b + 16] for a in range(3) for b in range(3)]
    assert any(torch.equal(x, c) or torch.equal(x, c.flip(-1)) for c in crops)
    # The manifest in root was found and every file checked against it.
    assert len(dm.checked_files) == 2 + 48


def test_class_subset_by_name_and_same_domain_test_split(visda):
    dm = VisDADataModule(str(visda["root"]), image_size=16, domain="validation", test_domain="validation",
                         test_fraction=0.25, classes=["truck", "car", "aeroplane"], val_fraction=0.0)
    dm.setup()
    train, test = dm.train_dataset.dataset, dm.test_dataset
    assert set(train.paths).isdisjoint(test.paths) and len(train) + len(test) == 6
    assert set(_labels(train) + _labels(test)) <= {0, 1, 2}
    assert all("/truck/" in p for p, y in zip(train.paths, train.targets.tolist()) if y == 0)
    other = VisDADataModule(str(visda["root"]), domain="validation", test_domain="validation", test_fraction=0.25,
                            classes=["truck", "car", "aeroplane"], seed=7, image_size=16)
    other.setup("test")
    assert other.test_dataset.paths == test.paths  # the held-out test part never depends on `seed`
    none = VisDADataModule(str(visda["root"]), test_domain=None, image_size=16)
    with pytest.raises(RuntimeError, match="has no test split"):
        none.test_dataloader()


def test_list_folder_label_mismatch_is_named(visda):
    lst = visda["root"] / "train" / "image_list.txt"
    lines = lst.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0] + " 7"
    lst.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataIntegrityError, match=r"train/image_list.txt: checksum mismatch"):
        VisDADataModule(str(visda["root"])).setup("fit")
    with pytest.raises(DataIntegrityError, match=r"image_list.txt, entry 5: bus/tra_2_0.png lies in the 'bus' "
                       r"folder but has label 7 \('person'\)"):
        VisDADataModule(str(visda["root"]), verify=False).setup("fit")


def test_damaged_and_missing_images(visda):
    img = visda["root"] / "validation" / "car" / "val_3_1.jpg"
    flip_byte(img)
    with pytest.raises(DataIntegrityError, match=r"car/val_3_1.jpg: checksum mismatch"):
        VisDADataModule(str(visda["root"])).setup("test")
    truncate(img, 0.3)
    dm = VisDADataModule(str(visda["root"]), verify=False, image_size=16)
    dm.setup("test")
    with pytest.raises(DataIntegrityError, match=r"val_3_1.jpg: cannot decode the image"):
        list(dm.test_dataloader())
    img.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"VisDA-2017 images \(1 listed in .*validation/image_list.txt but "
                       r"absent\).*car/val_3_1.jpg"):
        VisDADataModule(str(visda["root"]), verify=False).setup("test")


def test_empty_folder_names_the_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        VisDADataModule(str(tmp_path)).setup()
    msg = str(err.value)
    assert "'train' domain not found" in msg and "train/image_list.txt" in msg and "train.tar" in msg
    assert "csr.bu.edu/ftp/visda17/clf" in msg


def test_tar_extracted_once(tmp_path):
    write_visda(tmp_path, per_class=1)
    with tarfile.open(tmp_path / "validation.tar", "w") as tf:
        tf.add(tmp_path / "validation", arcname="validation")
    shutil.rmtree(tmp_path / "validation")
    dm = VisDADataModule(str(tmp_path), image_size=16)
    dm.setup("test")
    assert len(dm.test_dataset) == 12 and (tmp_path / "validation" / "image_list.txt").is_file()


def test_bad_arguments():
    with pytest.raises(ValueError, match="domain must be one of"):
        VisDADataModule(domain="synthetic")
    with pytest.raises(ValueError, match=r"classes must be distinct indices in 0\.\.11 or names among"):
        VisDADataModule(classes=["plane"])
