"""SaliencyCertification on a plain Classifier: logged certificates, image grid, state."""

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import CSVLogger

from lightning_robust.callbacks import SaliencyCertification
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.interpret import certified_topk_intersection, sparsified_smoothgrad
from lightning_robust.models import Classifier
from lightning_robust.nets import SmallCNN


class KeepInputs(pl.Callback):
    def __init__(self):
        self.x = None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.x is None:
            self.x = batch[0][:5].clone()


def test_logs_certificates_matching_a_direct_computation_and_an_image(tmp_path):
    pl.seed_everything(0)
    model = Classifier(SmallCNN(input_size=8), optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    cb = SaliencyCertification(radii=(0.0, 0.05, 0.2), num_samples=5, n_samples=128, sigma=0.2, tau=0.2,
                               k_fraction=0.25, seed=3)
    keep = KeepInputs()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=5, limit_val_batches=2,
                         logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, callbacks=[keep, cb])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    names = [cb.metric_name(r) for r in (0.0, 0.05, 0.2)]
    assert names[1] == "saliency/certified_topk@0.05"
    logged = [float(trainer.callback_metrics[n]) for n in names]
    assert logged == pytest.approx([cb.last[n] for n in names], abs=1e-6)
    assert 1 >= logged[0] >= logged[1] >= logged[2] >= 0
    # Same inputs, same noise seed: the direct computation agrees.
    model.eval()
    maps = sparsified_smoothgrad(model, keep.x, n_samples=128, sigma=0.2, tau=0.2,
                                 generator=torch.Generator().manual_seed(3))
    direct = certified_topk_intersection(maps, 16, [0.0, 0.05, 0.2], 0.2, 128).double().mean(0) / 16
    assert direct.tolist() == pytest.approx(logged, abs=1e-6)
    images = sorted((tmp_path / "lightning_logs" / "version_0" / "images").glob("saliency_maps_*.png"))
    assert len(images) == 2  # one per validation epoch (the sanity check is skipped)
    with Image.open(images[-1]) as im:
        assert im.width > 200 and im.height > 200
    state = cb.state_dict()
    fresh = SaliencyCertification()
    fresh.load_state_dict(state)
    assert fresh.last == cb.last


def test_every_n_epochs_and_argument_errors():
    with pytest.raises(ValueError, match="radii must list at least one"):
        SaliencyCertification(radii=())
    with pytest.raises(ValueError, match=r"radii must be a non-negative number, got -0\.1"):
        SaliencyCertification(radii=(0.1, -0.1))
    with pytest.raises(ValueError, match="n_samples must be a positive integer, got 0"):
        SaliencyCertification(n_samples=0)
    with pytest.raises(ValueError, match="sigma must be a positive number, got 0"):
        SaliencyCertification(sigma=0)
    with pytest.raises(ValueError, match=r"k_fraction must lie in \(0, 1\], got 0"):
        SaliencyCertification(k_fraction=0)
