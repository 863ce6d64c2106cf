"""CertificationCallback: logged values equal a by-hand reference; same values with 2 processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_robust.callbacks import CertificationCallback
from lightning_robust.certify import certify
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.models import Classifier
from lightning_robust.nets import MLP
from tests.helpers.ddp import ddp_trainer, single_trainer

RADII = (0.0, 0.05, 0.1, 0.2)


def _model() -> Classifier:
    pl.seed_everything(0)
    return Classifier(MLP(64, 10, (32, 32)))


def _dm() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, eval_batch_size=16, seed=0)


class _GatherResults(pl.Callback):
    """After validation, all-gather a callback's last results on every rank; assert they agree; save on rank 0."""

    def __init__(self, path: str, source: CertificationCallback) -> None:
        self.path, self.source = path, source

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = torch.tensor(list(self.source.last_results.values()), dtype=torch.float64)
        gathered = trainer.strategy.all_gather(values).reshape(trainer.world_size, -1)
        assert torch.equal(gathered[0], gathered[-1])
        if trainer.global_rank == 0:
            torch.save(gathered, self.path)


def test_logged_values_match_a_reference_and_figure_is_written(tmp_path):
    model, dm = _model(), _dm()
    cb = CertificationCallback("decision_boundary", radii=RADII, num_samples=40)
    trainer = single_trainer(tmp_path, max_epochs=1, limit_train_batches=3, callbacks=[cb])
    trainer.fit(model, datamodule=dm)
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("cert/")}
    assert set(logged) == {"cert/decision_boundary/mean_radius"} | {f"cert/decision_boundary/acc@{r:g}" for r in RADII}

    # Reference: the first 40 validation samples, certified and counted by hand.
    x, y = map(torch.cat, zip(*[(b[0], b[1]) for b in dm.val_dataloader()]))
    x, y = x[:40], y[:40]
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    r = certify(model.net, x, method="decision_boundary").detach()
    assert logged["cert/decision_boundary/mean_radius"] == pytest.approx(float(r.mean()), rel=1e-5)
    for eps in RADII:
        ok = (pred == y) & ((r > eps) | (eps == 0))
        assert logged[f"cert/decision_boundary/acc@{eps:g}"] == pytest.approx(float(ok.float().mean()), abs=1e-6)
    assert logged["cert/decision_boundary/acc@0"] > logged["cert/decision_boundary/acc@0.2"]
    assert cb.state_dict() == {"last_results": cb.last_results, "radii": list(RADII)}
    assert list((Path(tmp_path) / "images").glob("cert_decision_boundary_radii_step*.png"))


class _Bare(pl.LightningModule):
    """A LightningModule whose net is a differently named attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def validation_step(self, batch, batch_idx):
        return None


def test_net_resolution_schedule_and_arguments(tmp_path):
    dm = _dm()
    for net in (None, "body"):  # the module itself, or a dotted path
        cb = CertificationCallback("simplex", radii=(0.0,), num_samples=8, net=net, log_histogram=False)
        single_trainer(tmp_path, callbacks=[cb]).validate(_Bare(), datamodule=dm)
        assert set(cb.last_results) == {"cert/simplex/mean_radius", "cert/simplex/acc@0"}
    with pytest.raises(ValueError, match="net='nope'"):
        single_trainer(tmp_path, callbacks=[CertificationCallback(net="nope")]).validate(_Bare(), datamodule=dm)
    # every_n_epochs=2: nothing after the first epoch (and never during the sanity check)
    cb = CertificationCallback("simplex", every_n_epochs=2, num_samples=8)
    single_trainer(tmp_path, max_epochs=1, limit_train_batches=1, callbacks=[cb]).fit(_model(), datamodule=dm)
    assert cb.last_results == {}
    with pytest.raises(ValueError, match="method"):
        CertificationCallback("crown")
    with pytest.raises(ValueError, match="num_samples"):
        CertificationCallback(num_samples=0)
    with pytest.raises(ValueError, match=r"radii\[0\]"):
        CertificationCallback(radii=(-1.0,))


@pytest.mark.ddp
def test_two_processes_log_the_same_values_as_one(tmp_path):
    def run(trainer_fn, sub: str) -> tuple[dict[str, float], CertificationCallback]:
        cb = CertificationCallback("simplex", radii=RADII, num_samples=32)
        path = tmp_path / sub
        path.mkdir()
        trainer = trainer_fn(path, callbacks=[cb, _GatherResults(str(path / "res.pt"), cb)])
        out = trainer.validate(_model(), datamodule=_dm(), verbose=False)[0]
        return {k: float(v) for k, v in out.items() if k.startswith("cert/")}, cb

    ddp, _ = run(ddp_trainer, "ddp")
    one, cb = run(single_trainer, "one")
    assert set(ddp) == set(one) == set(cb.last_results) and len(one) == len(RADII) + 1
    for k in one:
        assert ddp[k] == pytest.approx(one[k], rel=1e-6, abs=1e-7), k
    gathered = torch.load(tmp_path / "ddp" / "res.pt", weights_only=True)
    assert gathered.shape[0] == 2 and torch.equal(gathered[0], gathered[1])  # every rank logged the same
    assert list((tmp_path / "ddp" / "images").glob("*.png"))
