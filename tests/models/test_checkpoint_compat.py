"""0.1.0 checkpoints (tests/fixtures, written before objectives were composable) still load and resume."""

import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_robust.attacks import FGSM, PGD
from lightning_robust.models import ARDStudent, Classifier
from lightning_robust.nets import MLP
from lightning_robust.objectives import AdversarialTraining, Distillation
from lightning_robust.utils import safe_load

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CLASSIFIER = FIXTURES / "classifier_free_0.1.0.ckpt"
ARD = FIXTURES / "ard_student_fast_0.1.0.ckpt"


def _same_weights(model: torch.nn.Module, raw: dict, arch: torch.nn.Module) -> None:
    arch.load_state_dict({k.removeprefix("net."): v for k, v in raw["state_dict"].items()})
    x = torch.rand(5, 1, 4, 4)
    assert torch.equal(model(x), arch(x))


def test_classifier_0_1_0_checkpoint_loads_onto_objectives():
    raw = safe_load(CLASSIFIER)
    model = Classifier.load_from_checkpoint(CLASSIFIER, net=MLP(16, 3, (8,)), attack=PGD(eps=0.1))
    _same_weights(model, raw, MLP(16, 3, (8,)))
    (adv,) = model.objectives
    assert isinstance(adv, AdversarialTraining) and adv.mode == "free" and adv.replays == 2
    assert adv.label_smoothing == pytest.approx(0.1) and not model.automatic_optimization
    # the carried free perturbation and the trip-wire history come back from their 0.1.0 places
    assert torch.equal(model._free_delta, raw["adversarial_training"]["free_delta"][0])
    assert model.tripwire_history == raw["adversarial_training"]["tripwire_history"]
    assert model.tripwire is not None and model.tripwire.batches == 1


def test_classifier_0_1_0_checkpoint_resumes_training(tmp_path):
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.rand(32, 1, 4, 4), torch.arange(32) % 3), batch_size=16)
    model = Classifier(MLP(16, 3, (8,)), attack=PGD(eps=0.1), adversarial_mode="free", free_replays=2,
                       tripwire_batches=1, label_smoothing=0.1)
    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, loader, ckpt_path=CLASSIFIER)
    # epoch 1 continued from the checkpoint: 2 batches x 2 replays more, and one more trip-wire value
    assert trainer.global_step == 2 * (2 * 2)
    assert len(model.tripwire_history) == 2
    assert model.tripwire_history[0] == safe_load(CLASSIFIER)["adversarial_training"]["tripwire_history"][0]


def test_ard_0_1_0_checkpoint_loads_onto_objectives():
    raw = safe_load(ARD)
    teacher = MLP(16, 3, (8,))
    teacher.load_state_dict(torch.load(FIXTURES / "ard_teacher_0.1.0.pt", weights_only=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the teacher's fingerprint matches: no warning
        model = ARDStudent.load_from_checkpoint(ARD, student=MLP(16, 3, (4,)), teacher=teacher,
                                                attack=PGD(eps=0.1, steps=2))
    _same_weights(model, raw, MLP(16, 3, (4,)))
    adv, distill = model.objectives
    assert isinstance(adv, AdversarialTraining) and adv.mode == "fast" and adv.weight == 0
    assert isinstance(model.train_attack, FGSM)
    assert isinstance(distill, Distillation) and (distill.temperature, distill.alpha) == (5.0, 0.7)
    assert model.seed == 3 and model.teacher is teacher
    with pytest.warns(UserWarning, match="teacher differs"):
        ARDStudent.load_from_checkpoint(ARD, student=MLP(16, 3, (4,)), teacher=MLP(16, 3, (8,)))
