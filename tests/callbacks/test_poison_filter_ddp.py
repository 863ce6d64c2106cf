"""2-process DDP: identical poisons and removals on both ranks, equal to a 1-process run (one shared spawn)."""

import pytest
import pytorch_lightning as pl
import torch

from lightning_robust.attacks import FeatureCollision
from lightning_robust.callbacks import DeepKNNPoisonFilter
from lightning_robust.datamodules import PoisonedDataModule
from lightning_robust.metrics import PoisonDetection, poison_detection_scores
from lightning_robust.nets import MLP
from tests.callbacks.test_poison_filter import ForeignClassifier, NoisyDigits
from tests.helpers.ddp import ddp_trainer, single_trainer


def _datamodule() -> PoisonedDataModule:
    torch.manual_seed(1)
    crafter = MLP(in_features=64, num_classes=10, hidden=(32,))
    return PoisonedDataModule(NoisyDigits(batch_size=64, val_fraction=0.0), attack=FeatureCollision(steps=5, beta=1.0),
                              feature_net=crafter, feature_layer="layers.2", target_class=3, base_class=8,
                              num_poisons=3)


def _filters() -> list[DeepKNNPoisonFilter]:
    return [DeepKNNPoisonFilter(layer="backbone.2", filter_epoch=0),
            DeepKNNPoisonFilter(method="l2_outlier", layer="backbone.2", filter_epoch=1, fraction=0.02)]


def _mask(indices: list[int], n: int) -> torch.Tensor:
    m = torch.zeros(n, dtype=torch.long)
    m[indices] = 1
    return m


class Probe(pl.Callback):
    """Gathers, at fit end, every rank's decisions, poisons, seen batches and a synced PoisonDetection."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(batch[2].tolist())

    def on_fit_end(self, trainer, pl_module):
        dm = trainer.datamodule
        n = len(dm.train_dataset)
        filters = [c for c in trainer.callbacks if isinstance(c, DeepKNNPoisonFilter)]
        out = {}
        for i, f in enumerate(filters):
            out[f"removed{i}"] = trainer.strategy.all_gather(_mask(f.removed_indices, n)).reshape(2, n)
        for epoch, seen in self.seen.items():
            out[f"seen{epoch}"] = trainer.strategy.all_gather(_mask(seen, n)).reshape(2, n)
        out["poisons"] = trainer.strategy.all_gather(dm.poisons.contiguous()).reshape(2, -1)
        # Each rank scores half of the decisions; the metric syncs the counts across processes.
        metric = PoisonDetection()
        rank = trainer.global_rank
        removed = _mask(filters[0].removed_indices, n).bool()
        metric.update(removed[rank::2], dm.is_poisoned[rank::2])
        scores = metric.compute()
        out["metric"] = trainer.strategy.all_gather(torch.stack([scores[k] for k in sorted(scores)])).reshape(2, -1)
        whole = poison_detection_scores(removed, dm.is_poisoned)
        out["whole"] = torch.stack([whole[k] for k in sorted(whole)])
        if trainer.global_rank == 0:
            torch.save(out, self.path)


@pytest.mark.ddp
def test_ranks_agree_and_match_one_process(tmp_path):
    trainer = ddp_trainer(tmp_path, max_epochs=3, limit_val_batches=0, reload_dataloaders_every_n_epochs=1,
                          callbacks=[*_filters(), Probe(str(tmp_path / "probe.pt"))])
    trainer.fit(ForeignClassifier(), datamodule=_datamodule())
    got = torch.load(tmp_path / "probe.pt", weights_only=True)
    for key in ("removed0", "removed1", "poisons", "metric"):
        assert torch.equal(got[key][0], got[key][1]), f"ranks disagree on {key}"
    assert torch.allclose(got["metric"][0], got["whole"])
    knn, l2 = got["removed0"][0].bool(), got["removed1"][0].bool()
    assert knn.any() and l2.any()
    seen = {e: (got[f"seen{e}"][0] | got[f"seen{e}"][1]).bool() for e in range(3)}
    # The k-NN filter acted before epoch 0, the L2 filter after epoch 0: no rank ever yields them again.
    assert not (seen[0] & knn).any() and torch.equal(seen[0], ~knn)
    assert not (seen[2] & (knn | l2)).any() and torch.equal(seen[2], ~(knn | l2))

    # One process, same seeds: the same poisons and the same k-NN decision before training.
    dm = _datamodule()
    single = _filters()[0]
    single_trainer(tmp_path / "one", max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                   callbacks=[single]).fit(ForeignClassifier(), datamodule=dm)
    assert torch.equal(dm.poisons.flatten(), got["poisons"][0].float())
    assert single.removed_indices == knn.nonzero().flatten().tolist()
