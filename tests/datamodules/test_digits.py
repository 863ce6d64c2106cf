import pytest
import torch

from lightning_robust.datamodules import DigitsDataModule, GaussianMixtureDataModule, load_digits_tensors


def test_digits_match_sklearn_and_range():
    from sklearn.datasets import load_digits

    x, y = load_digits_tensors(8, 1)
    ref = load_digits()
    assert x.shape == (1797, 1, 8, 8)
    assert torch.equal(y, torch.as_tensor(ref.target))
    assert torch.allclose(x[:, 0] * 16, torch.as_tensor(ref.images, dtype=torch.float32))
    x28, _ = load_digits_tensors(28, 3)
    assert x28.shape == (1797, 3, 28, 28) and x28.min() >= 0 and x28.max() <= 1
    assert torch.equal(x28[:, 0], x28[:, 2])


def _collect(ds):
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_splits_are_disjoint_complete_and_deterministic():
    dm = DigitsDataModule(val_fraction=0.1, test_fraction=0.2, seed=3)
    dm.setup()
    n_tr, n_va, n_te = len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)
    assert n_tr + n_va + n_te == 1797 and n_te == 359 and n_va == round(0.1 * (1797 - 359))
    tr_idx, va_idx = dm.train_dataset.indices, dm.val_dataset.indices
    assert not set(tr_idx) & set(va_idx)
    dm2 = DigitsDataModule(val_fraction=0.1, test_fraction=0.2, seed=3)
    dm2.setup()
    assert dm2.train_dataset.indices == tr_idx
    # The test split never depends on the seed.
    dm3 = DigitsDataModule(seed=99)
    dm3.setup()
    assert torch.equal(_collect(dm3.test_dataset), _collect(dm.test_dataset))
    assert dm3.train_dataset.indices != tr_idx


def test_with_index_and_exclusion():
    dm = DigitsDataModule(batch_size=50, with_index=True, val_fraction=0.0)
    dm.setup()
    seen = torch.cat([b[2] for b in dm.train_dataloader()])
    assert sorted(seen.tolist()) == list(range(len(dm.train_dataset)))
    x, y, idx = next(iter(dm.train_dataloader()))
    for j in range(3):
        ref_x, ref_y = dm.train_dataset[int(idx[j])]
        assert torch.equal(x[j], ref_x) and int(y[j]) == int(ref_y)
    dm.exclude_train_indices(torch.tensor([0, 5, 7]))
    seen = torch.cat([b[2] for b in dm.train_dataloader()])
    assert {0, 5, 7}.isdisjoint(seen.tolist()) and len(seen) == len(dm.train_dataset) - 3
    state = dm.state_dict()
    fresh = DigitsDataModule(batch_size=50, with_index=True, val_fraction=0.0)
    fresh.load_state_dict(state)
    assert fresh.excluded_train_indices == [0, 5, 7]


def test_class_subset_relabels():
    dm = DigitsDataModule(classes=[3, 8], val_fraction=0.0)
    dm.setup()
    labels = torch.tensor([int(dm.train_dataset[i][1]) for i in range(len(dm.train_dataset))])
    assert set(labels.tolist()) == {0, 1} and dm.num_classes == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": -3}, "batch_size must be a positive integer, got -3"),
        ({"image_size": 20}, "image_size must be one of"),
        ({"val_fraction": 1.5}, r"val_fraction must lie in \[0, 1\)"),
        ({"classes": [1, 1]}, "classes must be distinct digits"),
        ({"num_workers": -1}, "num_workers must be a non-negative number"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


def test_gaussian_mixture_proportions_and_density():
    pi = [0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05]
    dm = GaussianMixtureDataModule(proportions=pi, n_train=20000, n_test=10, val_fraction=0.0, std=0.1)
    dm.setup()
    y = torch.tensor([int(dm.train_dataset[i][1]) for i in range(len(dm.train_dataset))])
    freq = torch.bincount(y, minlength=9).double() / len(y)
    # Multinomial standard error at n=20000 is below 0.0033; allow 4 sigma.
    assert torch.allclose(freq, torch.tensor(pi, dtype=torch.float64), atol=0.014)
    # The exact density integrates to one (Riemann sum on a fine grid).
    r = torch.linspace(-3.5, 3.5, 701, dtype=torch.float64)
    gx, gy = torch.meshgrid(r, r, indexing="ij")
    pts = torch.stack([gx.flatten(), gy.flatten()], 1)
    mass = dm.log_density(pts).exp().sum() * (r[1] - r[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-3


@pytest.mark.parametrize(
    ("pi", "match"),
    [([0.5, 0.6] + [0.0] * 7, "must sum to one"), ([-0.1, 1.1] + [0.0] * 7, "non-negative"),
     ([0.5, 0.5], "must have grid_size\\*\\*2 = 9 entries")],
)
def test_gaussian_mixture_bad_proportions(pi, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixtureDataModule(proportions=pi)


def test_training_order_depends_only_on_seed_and_epoch():
    from lightning_robust.datamodules.base import EpochShuffleSampler

    s = EpochShuffleSampler(50, seed=4)
    e0 = list(s)
    torch.manual_seed(999)  # the global RNG must not matter (checkpoints do not hold it)
    assert list(s) == e0 and sorted(e0) == list(range(50))
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0 and sorted(e1) == list(range(50))
    assert list(EpochShuffleSampler(50, seed=5)) != e0
