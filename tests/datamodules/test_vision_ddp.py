"""2-process DDP: disjoint shards covering the split, identical splits on every rank, one download + extraction."""

import os
import shutil
from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_robust.datamodules import CIFAR10DataModule
from lightning_robust.models import Classifier
from lightning_robust.nets import SmallCNN
from tests.helpers.ddp import RankGather, ddp_trainer
from tests.helpers.vision_data import write_cifar


class EventLoggingCIFAR10(CIFAR10DataModule):
    """Logs prepare/download/extract/setup events to ``root/events.log``; "downloads" from a local mirror."""

    mirror: str = ""

    def _log(self, event: str) -> None:
        rank = self.trainer.global_rank if self.trainer is not None else -1
        with open(self.root / "events.log", "a") as f:
            f.write(f"{event} rank={rank} pid={os.getpid()}\n")

    def prepare_data(self) -> None:
        self._log("prepare")
        super().prepare_data()

    def _download(self, url: str, folder: Path, filename: str) -> Path:
        self._log("download")
        shutil.copy(self.mirror, folder / filename)
        self._verify([folder / filename])
        return folder / filename

    def _extract(self, archive: Path, dest_parent: Path, top: str) -> Path:
        self._log("extract")
        return super()._extract(archive, dest_parent, top)

    def setup(self, stage: str | None = None) -> None:
        self._log(f"setup:{getattr(stage, 'value', stage)}")
        super().setup(stage)


class SeenIndices(pl.Callback):
    """Gathers to rank 0 the training-set positions each rank saw in its single epoch."""

    def __init__(self, path):
        self.path, self.seen = str(path), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch[2].clone())

    def on_train_epoch_end(self, trainer, pl_module):
        gathered = trainer.strategy.all_gather(torch.cat(self.seen)).reshape(trainer.world_size, -1)
        if trainer.global_rank == 0:
            torch.save(gathered, self.path)


def train_split_of(trainer, module):
    """The rank's train/val split (positions in the full training set), for RankGather."""
    dm = trainer.datamodule
    return torch.tensor(dm.train_dataset.indices + dm.val_dataset.indices, dtype=torch.float64)


@pytest.mark.ddp
def test_ddp_shards_and_single_download(tmp_path):
    mirror = tmp_path / "mirror"
    info = write_cifar(mirror, n_per_batch=18, n_test=10, archive=True)  # 90 training images, archived
    root = tmp_path / "data"
    root.mkdir()
    shutil.copy(info["manifest"], root / "MD5SUMS")  # relative paths: valid once the files are in `root`
    dm = EventLoggingCIFAR10(str(root), download=True, checksums=str(root / "MD5SUMS"), batch_size=8,
                             with_index=True, val_fraction=0.2, seed=4)
    dm.mirror = str(mirror / "cifar-10-python.tar.gz")
    pl.seed_everything(0)
    model = Classifier(SmallCNN(in_channels=3, input_size=32), optimizer=partial(torch.optim.SGD, lr=0.01))
    callbacks = [SeenIndices(tmp_path / "seen.pt"), RankGather(tmp_path / "split.pt", train_split_of)]
    trainer = ddp_trainer(tmp_path, max_epochs=1, limit_val_batches=1, callbacks=callbacks)
    trainer.fit(model, datamodule=dm)

    events = (root / "events.log").read_text().splitlines()
    kinds = [e.split()[0] for e in events]
    # Lightning runs prepare_data on local rank 0 only; both ranks run setup and read the extracted files.
    assert kinds.count("prepare") == 1 and kinds.count("download") == 1 and kinds.count("extract") == 1
    assert sorted(e.split()[1] for e in events if e.startswith("setup:fit")) == ["rank=0", "rank=1"]
    assert next(e for e in events if e.startswith("download")).split()[1] == "rank=0"

    n = 72  # 90 - round(0.2 * 90)
    seen = torch.load(tmp_path / "seen.pt", weights_only=True)
    r0, r1 = set(seen[0].tolist()), set(seen[1].tolist())
    assert seen.shape == (2, n // 2) and not (r0 & r1) and r0 | r1 == set(range(n))
    split = torch.load(tmp_path / "split.pt", weights_only=True)  # RankGather asserted both ranks agree
    assert split.shape == (2, 90) and sorted(split[0].long().tolist()) == list(range(90))
