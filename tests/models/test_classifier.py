import pytest
import pytorch_lightning as pl
import torch

from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.models import Classifier
from lightning_robust.nets import MLP, SmallCNN
from lightning_robust.utils import load_module, safe_load


def _trainer(tmp_path, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, deterministic=True, **kw)


def test_learns_digits_and_checkpoint_is_weights_only(tmp_path):
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64)
    model = Classifier(SmallCNN(input_size=8), optimizer=lambda p: torch.optim.Adam(p, lr=2e-3))
    trainer = _trainer(tmp_path, max_epochs=4)
    trainer.fit(model, datamodule=dm)
    acc = trainer.test(model, datamodule=dm, verbose=False)[0]["test/acc"]
    assert acc > 0.85  # chance is 0.10; a few epochs of Adam reach ~0.95 on the bundled digits
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    state = safe_load(ckpt)  # weights_only=True: hparams hold primitives only
    assert state["hyper_parameters"]["num_classes"] == 10
    net = load_module(ckpt, into=SmallCNN(input_size=8))
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(net.eval()(x), model.eval()(x), atol=1e-6)


def test_predictions_match_net_and_training_reduces_loss(tmp_path):
    pl.seed_everything(0)
    net = MLP(64, 10, (32,))
    model = Classifier(net, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(model(x), net(x))
    dm = DigitsDataModule(batch_size=128, val_fraction=0.0)
    dm.setup()
    xs, ys = next(iter(dm.test_dataloader()))
    before = torch.nn.functional.cross_entropy(model(xs), ys).item()
    _trainer(tmp_path, max_epochs=3, limit_val_batches=0, enable_checkpointing=False).fit(model, datamodule=dm)
    after = torch.nn.functional.cross_entropy(model(xs), ys).item()
    assert after < 0.5 * before


def test_scheduler_is_wired(tmp_path):
    model = Classifier(MLP(64, 10, (8,)), optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
                       scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5))
    trainer = _trainer(tmp_path, max_epochs=3, limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=256, val_fraction=0.0))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.125)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes must be given"):
        Classifier(torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2"):
        Classifier(torch.nn.Linear(4, 2), num_classes=1)
    with pytest.raises(TypeError, match=r"net must be an nn\.Module"):
        Classifier("small_cnn")
    with pytest.raises(ValueError, match="scheduler_interval must be one of"):
        Classifier(MLP(4, 2), scheduler_interval="batch")
