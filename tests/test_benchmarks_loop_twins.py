"""The plain-loop twins of ``benchmarks/bench_training_loop.py`` do the work of ``Trainer.fit`` (issue 25, item 4).

A twin is timed against the Trainer as "the same work without Lightning"; that claim holds only if, from the
same initial weights, batches and random state, both leave the same parameters, buffers (BatchNorm
statistics, step counters) and mixture proportions after a few optimizer steps. A twin that skipped a critic
step, a generator step, the ``π`` update or the weight clipping would fail here.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from benchmarks.bench_training_loop import cases
from benchmarks.loop_twins import plain_fit, twin_step

STEPS = 6  # > n_critic = 5: the GANs take generator steps too


def _fit_trainer(model: pl.LightningModule, loader: DataLoader) -> None:
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=STEPS, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0)
    trainer.fit(model, train_dataloaders=loader)


_CASES = cases(n=STEPS * 8, batch=8, text_n=STEPS * 4, tiny=True)


@pytest.mark.parametrize("name", sorted(_CASES))
def test_twin_and_trainer_leave_the_same_state(name):
    case = _CASES[name]
    torch.manual_seed(0)
    twin = case.build()
    plain_fit(twin, case.loader, max_steps=STEPS)
    torch.manual_seed(0)
    fitted = case.build()
    _fit_trainer(fitted, case.loader)
    untouched = case.build()

    a, b, start = twin.state_dict(), fitted.state_dict(), untouched.state_dict()
    assert a.keys() == b.keys()
    moved = 0
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{name} {k}: {m}")
            moved += int(not torch.equal(a[key], start[key]))
        else:
            assert torch.equal(a[key], b[key]), f"{name} {key}: {a[key]} vs {b[key]}"
    assert moved > 0, "training moved no parameter: the comparison would be vacuous"


def test_every_module_has_a_twin():
    import lightning_robust.models as models

    benchmarked = {type(case.build()) for case in _CASES.values()}
    for cls_name in models.__all__:
        cls = getattr(models, cls_name)
        if isinstance(cls, type) and issubclass(cls, pl.LightningModule):
            assert cls in benchmarked, f"{cls_name} is not in the training-loop benchmark"
    for case in _CASES.values():
        twin_step(case.build())  # raises for a module without a twin
