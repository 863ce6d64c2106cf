"""2-process CPU DDP: data shards and rank consistency of the Classifier (one shared spawn)."""

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.models import Classifier
from lightning_robust.nets import SmallCNN
from tests.helpers.ddp import RankGather, ddp_trainer, flat_params, run_ddp_script, single_trainer


class SeenIndices(pl.Callback):
    """Record the dataset indices each rank trains on in epoch 0, gathered to rank 0."""

    def __init__(self, path):
        self.path, self.seen = str(path), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.seen.append(batch[2].clone())

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            mine = torch.cat(self.seen)
            gathered = trainer.strategy.all_gather(mine).reshape(trainer.world_size, -1)
            if trainer.global_rank == 0:
                torch.save(gathered, self.path)


def _model():
    # ddp_spawn pickles the module: optimizers must be partials or module-level functions, not lambdas.
    pl.seed_everything(0)
    return Classifier(SmallCNN(input_size=8), optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


@pytest.mark.ddp
def test_digits_shards_and_identical_weights(tmp_path):
    dm = DigitsDataModule(batch_size=32, with_index=True, seed=1)
    model = _model()
    trainer = ddp_trainer(tmp_path, max_epochs=2, limit_val_batches=2,
                          callbacks=[SeenIndices(tmp_path / "seen.pt"), RankGather(tmp_path / "params.pt")])
    trainer.fit(model, datamodule=dm)

    dm.setup()
    n = len(dm.train_dataset)
    seen = torch.load(tmp_path / "seen.pt", weights_only=True)
    r0, r1 = set(seen[0].tolist()), set(seen[1].tolist())
    # DistributedSampler pads the shorter shard by repeating (n % 2) samples; otherwise disjoint.
    assert len(r0 & r1) <= n % 2
    assert r0 | r1 == set(range(n))
    assert seen.shape[1] == (n + 1) // 2

    params = torch.load(tmp_path / "params.pt", weights_only=True)
    assert params.shape[0] == 2 and torch.equal(params[0], params[1])
    # ddp_spawn hands rank 0's weights back to this process.
    assert torch.equal(params[0], flat_params(model))
    assert not torch.equal(params[0], flat_params(_model()))  # training happened


@pytest.mark.ddp
def test_cli_ddp_subprocess(tmp_path):
    # strategy="ddp" re-launches the command line for rank 1, so it runs through a subprocess.
    repo_cfg = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    script = f"""
import json, os, torch
from lightning_robust.cli import LightningRobustCLI
from tests.helpers.ddp import flat_params
cli = LightningRobustCLI(args=["fit", "--config", {repo_cfg!r}, "--trainer.max_epochs=1",
    "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.strategy=ddp",
    "--trainer.enable_progress_bar=false", "--trainer.default_root_dir=runs",
    "--trainer.limit_val_batches=2"])
p = flat_params(cli.model)
g = cli.trainer.strategy.all_gather(p).reshape(2, -1)
if cli.trainer.global_rank == 0:
    json.dump({{"world": cli.trainer.world_size, "equal": bool(torch.equal(g[0], g[1])),
               "steps": cli.trainer.global_step}}, open(os.environ["RESULT_PATH"], "w"))
"""
    res = run_ddp_script(script, tmp_path)
    assert res["world"] == 2 and res["equal"]
    # 1294 training digits / (2 ranks x 64 per batch) -> 11 optimizer steps per epoch.
    assert res["steps"] == 11


def test_single_process_trainer_helper(tmp_path):
    # The 1-process helper matches the DDP helper's quiet defaults (used by rank-vs-single comparisons).
    t = single_trainer(tmp_path, max_epochs=1)
    assert t.world_size == 1 and t.logger is None
