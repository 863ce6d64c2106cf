"""PoisonedDataModule and FilteredDataset: swapped items keep clean labels, indices, crafting, state."""

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_robust.attacks import FeatureCollision, LayerFeatures
from lightning_robust.datamodules import DigitsDataModule, FilteredDataset, PoisonedDataModule, dataset_labels


def _labels(ds):
    return torch.tensor([int(ds[i][1]) for i in range(len(ds))])


def test_precomputed_poisons_replace_bases_with_clean_labels(tmp_path):
    clean = DigitsDataModule(val_fraction=0.0, batch_size=64)
    clean.setup()
    labels = dataset_labels(clean.train_dataset)
    assert torch.equal(labels, _labels(clean.train_dataset))
    positions = (labels == 8).nonzero().flatten()[:3].tolist()
    poisons = torch.rand(3, 1, 8, 8)
    dm = PoisonedDataModule(DigitsDataModule(val_fraction=0.0, batch_size=64), poisons=poisons,
                            poison_indices=positions, target_class=3, base_class=8)
    dm.setup()
    assert dm.poison_indices == sorted(positions) and int(dm.is_poisoned.sum()) == 3
    for j, p in enumerate(positions):
        x, y = dm.train_dataset[p][:2]
        assert torch.equal(x, poisons[j]) and int(y) == 8
    other = next(i for i in range(20) if i not in positions)
    assert torch.equal(dm.train_dataset[other][0], clean.train_dataset[other][0])
    assert int(dm.target_label) == 3 and dm.target.shape == (1, 8, 8)
    # Batches always carry indices; excluded positions disappear from the next loader.
    seen = torch.cat([b[2] for b in dm.train_dataloader()])
    assert sorted(seen.tolist()) == list(range(len(dm.train_dataset)))
    dm.exclude_train_indices(positions)
    seen = torch.cat([b[2] for b in dm.train_dataloader()])
    assert set(positions).isdisjoint(seen.tolist())
    # Round trip through a file, and through the checkpoint state.
    dm.save_poisons(tmp_path / "p.pt")
    again = PoisonedDataModule(DigitsDataModule(val_fraction=0.0), poisons=str(tmp_path / "p.pt"),
                               target_class=3, base_class=8)
    again.setup()
    assert again.poison_indices == dm.poison_indices and torch.equal(again.poisons, dm.poisons)
    state = dm.state_dict()
    fresh = PoisonedDataModule(DigitsDataModule(val_fraction=0.0), poisons=torch.zeros(3, 1, 8, 8),
                               poison_indices=positions, target_class=3, base_class=8)
    fresh.load_state_dict(state)
    fresh.setup()
    assert torch.equal(fresh.train_dataset[positions[0]][0], poisons[0])
    assert fresh.excluded_train_indices == sorted(positions)


def test_crafting_picks_nearest_bases_and_moves_them_toward_the_target(trained_digits_cnn):
    net = trained_digits_cnn
    dm = PoisonedDataModule(DigitsDataModule(val_fraction=0.0), attack=FeatureCollision(steps=30, lr=0.05, beta=0.5),
                            feature_net=net, feature_layer="classifier.3", target_class=3, base_class=8,
                            num_poisons=2, examples_per_class=40)
    dm.setup()
    labels = _labels(dm.train_dataset)
    assert torch.equal(torch.bincount(labels), torch.full((10,), 40))
    assert (labels[dm.poison_indices] == 8).all()
    f = LayerFeatures(net, "classifier.3")
    with torch.no_grad():
        ft = f(dm.target[None])
        base_imgs = torch.stack([dm.datamodule.train_dataset[i][0] for i in
                                 [dm.train_dataset.dataset.indices[p] for p in dm.base_indices]])
        all8 = torch.stack([dm.train_dataset.dataset[i][0] for i in (labels == 8).nonzero().flatten()])
        d_all = (f(all8) - ft).norm(dim=1)
        d_base = (f(base_imgs) - ft).norm(dim=1)
        d_poison = (f(dm.poisons) - ft).norm(dim=1)
    assert torch.allclose(d_base, torch.sort(d_all).values[:2])  # nearest bases chosen
    assert (d_poison < d_base).all()


def test_filtered_dataset_excludes_and_reports_original_indices():
    ds = FilteredDataset(TensorDataset(torch.arange(10.0), torch.arange(10) % 3), with_index=True)
    ds.exclude([2, 5])
    ds.exclude(torch.tensor([5, 9]))
    assert len(ds) == 7 and ds.excluded_indices == [2, 5, 9]
    assert [int(ds[i][2]) for i in range(len(ds))] == [0, 1, 3, 4, 6, 7, 8]
    assert float(ds[2][0]) == 3.0
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        ds.exclude([10])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_class": 2, "base_class": 2, "poisons": torch.zeros(1, 1, 8, 8)}, "target_class and base_class"),
        ({}, "give either precomputed `poisons` or an `attack`"),
        ({"attack": FeatureCollision(steps=1)}, "needs `feature_net`"),
        ({"poisons": "missing.pt"}, "poisons file 'missing.pt' does not exist"),
        ({"poisons": torch.zeros(1, 1, 8, 8), "num_poisons": 0}, "num_poisons must be a positive integer"),
        ({"poisons": torch.zeros(1, 1, 8, 8), "base_selection": "best"}, "base_selection must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoisonedDataModule(DigitsDataModule(), **kwargs)


def test_not_a_robust_datamodule():
    with pytest.raises(TypeError, match="datamodule must be a RobustDataModule"):
        PoisonedDataModule(object(), poisons=torch.zeros(1, 1, 8, 8))  # type: ignore[arg-type]
