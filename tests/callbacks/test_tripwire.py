"""TripWire as a plain callback: on a foreign module, its held batches, its accuracy and its errors."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_robust.attacks import PGD
from lightning_robust.attacks.adversarial_training import robust_correct
from lightning_robust.callbacks import TripWire


class Foreign(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x):
        return self.body(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # frozen weights: the accuracy is reproducible


def _fit(tmp_path, callback, epochs=2):
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.rand(24, 1, 4, 4), torch.arange(24) % 3), batch_size=8)
    model = Foreign()
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path)
    trainer.fit(model, loader)
    return model, trainer, loader


def test_tripwire_measures_the_attack_accuracy_on_its_held_batches(tmp_path):
    attack = PGD(eps=0.2, alpha=0.1, steps=3, random_start=False)  # deterministic: comparable by hand
    wire = TripWire(batches=2, attack=attack)
    model, trainer, loader = _fit(tmp_path, wire)
    held = list(loader)[:2]
    correct, total = robust_correct(model, attack, [(x, y) for x, y in held])
    assert wire.history == [correct / total] * 2  # frozen weights: the same value after both epochs
    assert trainer.callback_metrics["train/tripwire_acc"].item() == pytest.approx(correct / total)
    assert wire.state_dict() == {"tripwire_history": wire.history}


def test_tripwire_without_attack_needs_one_on_the_module(tmp_path):
    with pytest.raises(ValueError, match="has none: pass attack=PGD"):
        _fit(tmp_path, TripWire(batches=1))
    with pytest.raises(ValueError, match="tripwire_batches must be a positive integer"):
        TripWire(batches=0)
    with pytest.raises(TypeError, match="tripwire_attack must be an Attack"):
        TripWire(attack="pgd")  # type: ignore[arg-type]
