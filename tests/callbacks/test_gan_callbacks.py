"""SampleGrid and GANEvaluation on a tiny GAN: files, logged names and values against direct computations."""

from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torchvision.utils import make_grid

from lightning_robust.callbacks import GANEvaluation, SampleGrid
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.metrics import ClassifierFeatures, image_quality
from lightning_robust.models import GAN, Classifier
from lightning_robust.nets import DCGANDiscriminator, DCGANGenerator, SmallCNN


def tiny_gan() -> GAN:
    torch.manual_seed(0)
    return GAN(DCGANGenerator(8, 1, 8, 2), DCGANDiscriminator(8, 1, 2), n_critic=2, n_fixed_latents=16)


def test_grid_and_metrics_logged_as_computed_directly(tmp_path, trained_digits_cnn):
    dm = DigitsDataModule(image_size=8, batch_size=64, val_fraction=0.1, test_fraction=0.5, seed=0)
    ev = GANEvaluation(trained_digits_cnn, feature_name="smallcnn_digits", num_fake=150, kid_subset_size=50,
                       is_splits=1, seed=3)
    grid = SampleGrid(num_samples=16, nrow=4)
    gan = tiny_gan()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=pl.loggers.CSVLogger(tmp_path), callbacks=[ev, grid],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_train_batches=3)
    trainer.fit(gan, datamodule=dm)

    names = ev.metric_names()
    assert names == {"fid": "val/fid_smallcnn_digits", "kid": "val/kid_smallcnn_digits",
                     "is": "val/is_smallcnn_digits"}
    real = torch.cat([b[0] for b in dm.val_dataloader()])
    z = torch.randn(150, 8, generator=torch.Generator().manual_seed(3))
    fake = gan.sample(z=z)
    ref = image_quality(real, fake, ClassifierFeatures(trained_digits_cnn),
                        ClassifierFeatures(trained_digits_cnn, None), kid_subset_size=50, is_splits=1)
    logged = trainer.callback_metrics
    assert logged[names["fid"]].item() == pytest.approx(ref["fid"], rel=1e-4)
    assert logged[names["is"]].item() == pytest.approx(ref["is"], rel=1e-4)  # one split: order-free
    assert ev.last["fid"] == pytest.approx(logged[names["fid"]].item())

    assert grid.last_path is not None and grid.last_path.parent == tmp_path / "lightning_logs" / "version_0" / "images"
    png = np.asarray(Image.open(grid.last_path).convert("L"))
    expected = make_grid(gan.sample(16), nrow=4, padding=2, pad_value=1.0)[0]
    assert png.shape == (4 * 10 + 2, 4 * 10 + 2)
    assert np.array_equal(png, (expected * 255).round().to(torch.uint8).numpy())


def test_feature_checkpoint_and_single_process_evaluate(tmp_path, trained_digits_cnn):
    clf = Classifier(trained_digits_cnn)
    trainer = pl.Trainer(max_steps=0, logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(clf)
    trainer.save_checkpoint(tmp_path / "clf.ckpt")
    torch.manual_seed(123)
    ev = GANEvaluation(SmallCNN(1, 10, 8), feature_checkpoint=str(tmp_path / "clf.ckpt"), kid=False,
                       inception_score=False, max_real=100, real_split="test")
    assert ev.feature_name == "smallcnn" and ev.metric_names() == {"fid": "val/fid_smallcnn"}
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(ev.features(x), ClassifierFeatures(trained_digits_cnn)(x))
    dm = DigitsDataModule(image_size=8, test_fraction=0.5, seed=1)
    dm.setup("test")
    out = ev.score(SimpleNamespace(datamodule=dm, global_rank=0, world_size=1), tiny_gan())
    again = ev.score(SimpleNamespace(datamodule=dm, global_rank=0, world_size=1), tiny_gan())
    assert out["fid"] > 0 and out == again  # cached real statistics, same latents: same value


def test_bad_arguments(trained_digits_cnn):
    with pytest.raises(ValueError, match="real_split must be one of"):
        GANEvaluation(trained_digits_cnn, real_split="holdout")
    with pytest.raises(ValueError, match="every_n_epochs must be >= 0"):
        GANEvaluation(trained_digits_cnn, every_n_epochs=-1)
    with pytest.raises(ValueError, match=r"layer 'features\.99' does not exist"):
        GANEvaluation(trained_digits_cnn, feature_layer="features.99")
    with pytest.raises(ValueError, match="nrow must be a positive integer"):
        SampleGrid(nrow=0)
