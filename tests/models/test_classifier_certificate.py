"""Certified-robust training through Classifier(certificate_weight=...): the certificate term works."""

import pytest
import pytorch_lightning as pl
import torch

from lightning_robust.certify import simplex_certificate
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.models import Classifier
from lightning_robust.nets import MLP
from lightning_robust.utils import safe_load


def _fit(tmp_path, weight: float, method: str = "simplex") -> tuple[Classifier, pl.Trainer]:
    pl.seed_everything(0)
    model = Classifier(MLP(64, 10, (32,)), certificate_weight=weight, certificate_method=method,
                       certificate_radius=1.0)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=1,
                         deterministic=True)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, seed=0))
    return model.eval(), trainer


def test_certificate_term_enlarges_certified_radii(tmp_path, digits_tensors):
    x, _ = digits_tensors
    x = x[1400:1500]
    plain, _ = _fit(tmp_path / "plain", 0.0)
    robust, trainer = _fit(tmp_path / "robust", 1.0)
    assert {"train/certificate", "train/certificate_loss"} <= set(trainer.callback_metrics)
    r_plain = simplex_certificate(plain.net, x).mean()
    r_robust = simplex_certificate(robust.net, x).mean()
    assert r_robust > 1.5 * r_plain
    ckpt = next((tmp_path / "robust" / "checkpoints").glob("*.ckpt"))
    hp = safe_load(ckpt)["hyper_parameters"]  # primitives only: loads with weights_only=True
    assert hp["certificate_weight"] == 1.0 and hp["certificate_method"] == "simplex"


def test_lipschitz_method_and_argument_checks(tmp_path):
    _, trainer = _fit(tmp_path, 1.0, "lipschitz")
    assert float(trainer.callback_metrics["train/certificate"]) > 0
    with pytest.raises(ValueError, match="certificate_weight"):
        Classifier(MLP(64, 10), certificate_weight=-1.0)
    with pytest.raises(ValueError, match="certificate_method"):
        Classifier(MLP(64, 10), certificate_method="decision_boundary")
    with pytest.raises(ValueError, match="certificate_radius"):
        Classifier(MLP(64, 10), certificate_radius=0.0)
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/loss"])))
