"""The colour-shifted digits pair: disjoint halves, class proportions, the colour blend's closed form, pairing."""

import pytest
import torch

from lightning_robust.datamodules import ColoredDigitsDataModule, DomainAdaptationDataModule
from lightning_robust.datamodules.colored_digits import colorize_digits


def _labels(dm: ColoredDigitsDataModule, split: str) -> torch.Tensor:
    ds = dm.test_dataset if split == "test" else dm.train_dataset.dataset
    return ds.tensors[1]


def test_colorize_is_the_absolute_difference_with_a_smooth_background():
    x = torch.rand(5, 1, 16, 16)
    out = colorize_digits(x, seed=3)
    background = colorize_digits(torch.zeros_like(x), seed=3)
    assert out.shape == (5, 3, 16, 16) and torch.allclose(out, (background - x).abs())
    assert torch.equal(out, colorize_digits(x, seed=3)) and not torch.equal(out, colorize_digits(x, seed=4))


def test_halves_are_disjoint_and_proportions_follow_the_request():
    p = [0.625, 0.3125, 0.0625]
    a = ColoredDigitsDataModule(colored=False, channels=1, half=0, classes=[1, 4, 8], class_proportions=p,
                                val_fraction=0.0, image_size=8)
    b = ColoredDigitsDataModule(colored=True, half=1, classes=[1, 4, 8], class_proportions=p[::-1],
                                val_fraction=0.0, image_size=8)
    a.setup(), b.setup()
    xa = torch.cat([a.train_dataset.dataset.tensors[0], a.test_dataset.tensors[0]]).flatten(1)
    xb_grey = ColoredDigitsDataModule(colored=False, channels=1, half=1, classes=[1, 4, 8], val_fraction=0.0,
                                      image_size=8)
    xb_grey.setup()
    xb = torch.cat([xb_grey.train_dataset.dataset.tensors[0], xb_grey.test_dataset.tensors[0]]).flatten(1)
    assert torch.cdist(xa, xb).min() > 0  # no image of one half appears in the other
    for dm, want in ((a, p), (b, p[::-1])):
        freq = torch.bincount(_labels(dm, "train"), minlength=3).double()
        assert torch.allclose(freq / freq.sum(), torch.tensor(want, dtype=torch.double), atol=0.03)
    assert b.train_dataset.dataset.tensors[0].shape[1:] == (3, 8, 8)


def test_pairing_and_errors():
    src = ColoredDigitsDataModule(colored=False, classes=[0, 1], batch_size=16, image_size=8)
    tgt = ColoredDigitsDataModule(colored=True, classes=[0, 1], batch_size=16, image_size=8)
    dm = DomainAdaptationDataModule(src, tgt)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))[0]
    assert set(batch) == {"source", "target"} and batch["target"][0].shape == (16, 3, 8, 8)
    val_t, val_s = dm.val_dataloader()
    assert val_t.dataset is not None and next(iter(val_t))[0].shape[1] == 3 and next(iter(val_s))[0].shape[1] == 3
    with pytest.raises(ValueError, match="channels must be 3 for colored digits"):
        ColoredDigitsDataModule(colored=True, channels=1)
    with pytest.raises(ValueError, match="class_proportions must have one entry per kept class"):
        ColoredDigitsDataModule(classes=[1, 2], class_proportions=[1.0])
    with pytest.raises(ValueError, match="classes must be distinct digits"):
        ColoredDigitsDataModule(classes=[1, 1])
