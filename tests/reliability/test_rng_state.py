"""RNGStateCheckpoint: generator states round-trip through a weights-only checkpoint, per rank."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_robust.callbacks import RNGStateCheckpoint
from lightning_robust.callbacks.rng_state import _unpickle_state, capture_rng_state, restore_rng_state
from lightning_robust.models import Classifier
from lightning_robust.nets import MLP
from lightning_robust.utils import CheckpointError, safe_load
from tests.helpers.ddp import ddp_trainer


def _draw() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(()))  # noqa: NPY002


def test_capture_restore_replays_every_generator():
    state = capture_rng_state()
    first = [_draw() for _ in range(3)]
    restore_rng_state(state)
    assert [_draw() for _ in range(3)] == first


def test_state_survives_a_weights_only_checkpoint(tmp_path):
    torch.save({"rng": capture_rng_state()}, tmp_path / "c.ckpt")
    expected = _draw()
    restore_rng_state(safe_load(tmp_path / "c.ckpt")["rng"])
    assert _draw() == expected


def test_generator_state_blob_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    blob = torch.frombuffer(bytearray(pickle.dumps(Evil())), dtype=torch.uint8)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _unpickle_state(blob)
    assert not (tmp_path / "pwned").exists()
    # Sanity: a legitimate state passes the restricted unpickler.
    assert _unpickle_state(torch.frombuffer(bytearray(pickle.dumps(random.getstate())), dtype=torch.uint8))


class _FakeTrainer:
    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world


def _restore_as(rank: int, world: int, saved: dict) -> list[tuple]:
    callback = RNGStateCheckpoint()
    callback._trainer = _FakeTrainer(rank, world)  # type: ignore[assignment]
    callback.load_state_dict(saved)
    return [_draw() for _ in range(4)]


def test_more_ranks_than_saved_warn_and_get_distinct_reproducible_states():
    saved = {"ranks": [capture_rng_state()]}  # a 1-process checkpoint
    expected_rank0 = [_draw() for _ in range(4)]
    with pytest.warns(UserWarning, match=r"generator states of 1 rank\(s\), this run has 3.*Ranks 1\.\.2 get distinct"):
        rank0 = _restore_as(0, 3, saved)
    assert rank0 == expected_rank0  # the saved rank continues its own stream exactly
    rank1, rank2 = _restore_as(1, 3, saved), _restore_as(2, 3, saved)
    for gen in range(3):  # Python, NumPy and torch each differ between every pair of ranks
        streams = [tuple(d[gen] for d in draws) for draws in (rank0, rank1, rank2)]
        assert len(set(streams)) == 3, gen
    assert _restore_as(1, 3, saved) == rank1  # resuming again with this world size gives the same streams


def test_rng_checkpoint_without_ranks_is_a_clear_error():
    callback = RNGStateCheckpoint()
    for bad in ({"ranks": []}, {}, {"ranks": None}):
        with pytest.raises(CheckpointError, match=r"holds no ranks.*state_dict\['ranks'\]"):
            callback.load_state_dict(bad)
    with pytest.raises(CheckpointError, match=r"state_dict\['ranks'\]\[0\] is not a generator state"):
        callback.load_state_dict({"ranks": [{"torch": torch.get_rng_state()}]})


class _SaveRanks(pl.Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)  # every rank assembles it; rank 0 writes


def _seed_per_rank(trainer: pl.Trainer) -> None:
    torch.manual_seed(100 + trainer.global_rank)


class _RankSeed(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        _seed_per_rank(trainer)


@pytest.mark.ddp
def test_ddp_checkpoint_holds_each_ranks_state(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    data = DataLoader(TensorDataset(torch.rand(16, 1, 4, 4), torch.randint(0, 2, (16,))), batch_size=4)
    model = Classifier(MLP(16, 2, hidden=(4,)))
    ckpt = tmp_path / "ddp.ckpt"
    ddp_trainer(tmp_path, max_epochs=1, callbacks=[_RankSeed(), RNGStateCheckpoint(), _SaveRanks(str(ckpt))]).fit(
        model, data)
    ranks = safe_load(ckpt)["callbacks"]["RNGStateCheckpoint"]["ranks"]
    assert len(ranks) == 2
    # Each rank's stream is its own: rank r was seeded with 100 + r before training.
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])


def _fit_dropout(tmp_path, epochs: int, callbacks: list, ckpt_path: str | None = None, save: str | None = None):
    from tests.reliability.resume_cases import TRAINER_KW, classifier_dropout

    model, dm, _ = classifier_dropout()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, deterministic=True, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=callbacks, **TRAINER_KW)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    if save:
        trainer.save_checkpoint(save)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("with_callback", [True, False])
def test_dropout_resume_is_exact_only_with_the_callback(tmp_path, with_callback):
    def cbs():
        return [RNGStateCheckpoint()] if with_callback else []

    pl.seed_everything(0)
    straight = _fit_dropout(tmp_path, 4, cbs())
    pl.seed_everything(0)
    _fit_dropout(tmp_path, 2, cbs(), save=str(tmp_path / "mid.ckpt"))
    pl.seed_everything(999)
    resumed = _fit_dropout(tmp_path, 4, cbs(), ckpt_path=str(tmp_path / "mid.ckpt"))
    # The control: without the generator states, dropout masks after the resume differ.
    assert torch.equal(straight, resumed) is with_callback


class _RankStreams(pl.Callback):
    """After the resume's restore, every rank draws from its generators; rank 0 writes all ranks' draws."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mine = torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))],  # noqa: NPY002
                            dtype=torch.float64)
        gathered = trainer.strategy.all_gather(mine).reshape(trainer.world_size, 3)
        if trainer.global_rank == 0:
            torch.save(gathered.cpu(), self.path)


@pytest.mark.slow
@pytest.mark.ddp
def test_one_rank_checkpoint_resumed_on_two_ddp_ranks_gives_distinct_streams(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_robust.callbacks import AtomicCheckpointIO

    data = DataLoader(TensorDataset(torch.rand(16, 1, 4, 4), torch.randint(0, 2, (16,))), batch_size=4)
    ckpt, draws = tmp_path / "one.ckpt", tmp_path / "draws.pt"
    single = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[RNGStateCheckpoint()])
    single.fit(Classifier(MLP(16, 2, hidden=(4,))), data)
    single.save_checkpoint(ckpt)
    assert len(safe_load(ckpt)["callbacks"]["RNGStateCheckpoint"]["ranks"]) == 1
    ddp_trainer(tmp_path, max_epochs=2, plugins=[AtomicCheckpointIO()],
                callbacks=[RNGStateCheckpoint(), _RankStreams(str(draws))]).fit(
        Classifier(MLP(16, 2, hidden=(4,))), data, ckpt_path=str(ckpt))
    rank0, rank1 = torch.load(draws, weights_only=True)
    # Python, NumPy and torch: rank 1 (which the checkpoint has no state for) draws its own numbers.
    assert all(a != b for a, b in zip(rank0.tolist(), rank1.tolist(), strict=True)), (rank0, rank1)

