"""ARDStudent (arXiv 1905.09747): the loss, the frozen teacher, fast ARD, resume, DDP and errors."""

import copy
import math
import warnings
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_robust.attacks import FGSM, PGD
from lightning_robust.callbacks import RobustnessEvaluation
from lightning_robust.datamodules import DigitsDataModule, load_digits_tensors
from lightning_robust.models import ARDStudent, Classifier
from lightning_robust.models.ard import ard_loss, distillation_kl, paper_attack, paper_optimizer, paper_scheduler
from lightning_robust.nets import SmallCNN
from lightning_robust.utils import CheckpointError, safe_load
from tests.helpers.ddp import RankGather, ddp_trainer, flat_params


def _trainer(tmp_path, **kw):
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("limit_val_batches", 0)
    kw.setdefault("logger", False)
    return pl.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, deterministic=True, **kw)


def _reference_loss(s_adv, t, s_clean, y, temperature, alpha):
    """The ARD loss written out with explicit sums (no torch KL or cross-entropy)."""
    total = 0.0
    n = s_adv.shape[0]
    for i in range(n):
        zt = [float(v) / temperature for v in t[i]]
        zs = [float(v) / temperature for v in s_adv[i]]
        lt = math.log(sum(math.exp(v) for v in zt))
        ls = math.log(sum(math.exp(v) for v in zs))
        kl = sum(math.exp(a - lt) * ((a - lt) - (b - ls)) for a, b in zip(zt, zs))
        zc = [float(v) for v in s_clean[i]]
        ce = math.log(sum(math.exp(v) for v in zc)) - zc[int(y[i])]
        total += alpha * temperature**2 * kl + (1 - alpha) * ce
    return total / n


def test_ard_loss_matches_an_independent_computation():
    g = torch.Generator().manual_seed(3)
    s_adv, t, s_clean = (3 * torch.randn(5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.tensor([0, 3, 1, 2, 3])
    for temperature, alpha in ((30.0, 1.0), (1.0, 0.5), (4.0, 0.0), (2.0, 0.9)):
        got = ard_loss(s_adv, t, s_clean, y, temperature=temperature, alpha=alpha)
        assert float(got) == pytest.approx(_reference_loss(s_adv, t, s_clean, y, temperature, alpha), rel=1e-10)
    # The authors' element-mean is the same KL divided by the number of classes.
    batchmean = distillation_kl(s_adv, t, 30.0, "batchmean")
    assert float(distillation_kl(s_adv, t, 30.0, "mean")) == pytest.approx(float(batchmean) / 4, rel=1e-12)
    # Closed-form gradient: d/ds [τ² KL(p_t ‖ p_s)] / N = τ (softmax(s/τ) - softmax(t/τ)) / N; none to the teacher.
    s = s_adv.clone().requires_grad_(True)
    tt = t.clone().requires_grad_(True)
    distillation_kl(s, tt, 7.0).backward()
    expected = 7.0 * (F.softmax(s_adv / 7.0, 1) - F.softmax(t / 7.0, 1)) / 5
    assert torch.allclose(s.grad, expected, atol=1e-12) and tt.grad is None


def test_element_mean_kl_is_computed_without_torchs_reduction_warning():
    # The authors' reduction="mean" (element mean over N·C) used to go through F.kl_div(reduction="mean"),
    # which warns on every call; the value must stay that element mean, now computed without the warning.
    g = torch.Generator().manual_seed(5)
    s, t = (2 * torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(2))
    tau = 3.0
    p_t = F.softmax(t / tau, 1)
    elementwise = p_t * (p_t.log() - F.log_softmax(s / tau, 1))  # [N, C] terms of KL(p_t ‖ p_s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_mean = distillation_kl(s, t, tau, "mean")
        got_batchmean = distillation_kl(s, t, tau, "batchmean")
    assert float(got_mean) == pytest.approx(tau**2 * float(elementwise.mean()), rel=1e-12)
    assert float(got_batchmean) == pytest.approx(tau**2 * float(elementwise.sum() / 6), rel=1e-12)


def test_ard_loss_errors():
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="student_clean_logits"):
        ard_loss(s, s, alpha=0.5)
    with pytest.raises(ValueError, match="same shape"):
        ard_loss(s, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        ard_loss(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="kl_reduction"):
        ard_loss(s, s, reduction="sum")


def test_training_loss_is_kl_of_student_on_pgd_examples_to_teacher_on_clean(trained_digits_cnn):
    teacher = copy.deepcopy(trained_digits_cnn)
    attack = PGD(eps=0.1, alpha=0.03, steps=3)
    model = ARDStudent(SmallCNN(input_size=8), teacher, attack=attack, temperature=5.0, alpha=0.7)
    x, y = load_digits_tensors(8, 1)
    x, y = x[:16], y[:16]
    loss, logits, _ = model.training_loss(x, y)
    x_adv = attack(model.net, x, y, generator=model.step_generator(x.device))
    assert attack.within_budget(x_adv, x).all() and not torch.equal(x_adv, x)
    expected = ard_loss(model.net(x_adv), teacher(x), model.net(x), y, temperature=5.0, alpha=0.7)
    assert torch.allclose(loss, expected) and torch.allclose(logits, model.net(x_adv))
    # KD ("clean") distils on x itself; the PGD default is the paper's.
    kd = ARDStudent(model.net, teacher, adversarial_mode="clean", temperature=5.0, alpha=0.7)
    assert kd.train_attack is None and kd.attack is None
    assert torch.allclose(kd.training_loss(x, y)[0], ard_loss(model.net(x), teacher(x), model.net(x), y, 5.0, 0.7))
    default = ARDStudent(SmallCNN(input_size=8), teacher).attack
    assert isinstance(default, PGD) and (default.steps, default.eps, default.alpha) == (10, 8 / 255, 2 / 255)
    assert default.random_start and paper_attack().threat.norm == "linf"
    fast = ARDStudent(SmallCNN(input_size=8), teacher, attack=PGD(eps=0.1), adversarial_mode="fast").train_attack
    assert isinstance(fast, FGSM) and fast.random_start and fast.alpha == pytest.approx(0.125)
    sgd = paper_optimizer([nn.Parameter(torch.zeros(1))])
    assert (sgd.defaults["lr"], sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.1, 0.9, 2e-4)
    assert paper_scheduler(sgd).milestones == {100: 1, 150: 1}


def _one_sgd_step(tmp_path, student, teacher, x, y, **kw) -> list[torch.Tensor]:
    """Parameter change of one plain-SGD (lr 1, no momentum) training step of ARDStudent on (x, y)."""
    model = ARDStudent(copy.deepcopy(student), teacher, attack=PGD(eps=0.1, alpha=0.03, steps=2), temperature=4.0,
                       optimizer=partial(torch.optim.SGD, lr=1.0), seed=3, **kw)
    before = [p.detach().clone() for p in model.parameters()]
    _trainer(tmp_path, max_steps=1).fit(model, DataLoader(TensorDataset(x, y), batch_size=len(y)))
    return [p.detach() - b for p, b in zip(model.parameters(), before)]


def test_kl_reduction_mean_takes_one_over_classes_of_the_batchmean_step(tmp_path, trained_digits_cnn):
    # The authors' nn.KLDivLoss() ("mean") step is the true-KL ("batchmean") step divided by the 10 classes
    # (same batch, same attack draws: the attack does not depend on the reduction).
    # In float64, so that "after - before" keeps the step's digits.
    torch.manual_seed(0)
    student, teacher = SmallCNN(input_size=8).double(), copy.deepcopy(trained_digits_cnn).double()
    x, y = load_digits_tensors(8, 1)
    x, y = x[:32].double(), y[:32]
    mean = _one_sgd_step(tmp_path, student, teacher, x, y, kl_reduction="mean")
    batchmean = _one_sgd_step(tmp_path, student, teacher, x, y, kl_reduction="batchmean")
    assert any(float(d.abs().max()) > 0 for d in batchmean)
    for a, b in zip(mean, batchmean):
        assert torch.allclose(a * 10, b, rtol=1e-8, atol=1e-14)


class _ModeProbe(nn.Module):
    """A BatchNorm + dropout student that records, per forward pass, whether BatchNorm and dropout train."""

    def __init__(self) -> None:
        super().__init__()
        self.num_classes = 10
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(32, 10))
        self.seen: list[tuple[bool, bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((torch.is_grad_enabled() and x.requires_grad, self.body[2].training, self.body[4].training))
        return self.body(x)


@pytest.mark.parametrize("train_mode", [True, False])
def test_attack_train_mode_attacks_the_student_with_batchnorm_and_dropout_active(tmp_path, trained_digits_cnn,
                                                                                train_mode):
    # The authors run PGD on the student in train mode: every attack forward pass (input requires grad) sees
    # BatchNorm and dropout in training mode, BatchNorm's running statistics move during the attack, and the
    # student's flags are as before afterwards. The default attacks in eval mode: running stats untouched.
    torch.manual_seed(0)
    student = _ModeProbe()
    attack = PGD(eps=0.1, alpha=0.03, steps=3)
    model = ARDStudent(student, trained_digits_cnn, attack=attack, attack_train_mode=train_mode)
    assert attack.model_mode == "eval"  # the caller's attack object is not modified
    x, y = load_digits_tensors(8, 1)
    x, y = x[:16], y[:16]
    model.train()
    bn = student.body[2]
    tracked = int(bn.num_batches_tracked)
    x_adv = model.train_attack(model, x, y)
    attack_passes = [s for s in student.seen if s[0]]
    assert len(attack_passes) == 3 and not torch.equal(x_adv, x)
    assert all(s[1:] == (train_mode, train_mode) for s in attack_passes)
    assert int(bn.num_batches_tracked) - tracked == (3 if train_mode else 0)
    assert model.training and bn.training and student.body[4].training  # flags restored
    model.eval()
    model.train_attack(model, x, y)
    assert not model.training and not bn.training and not student.body[4].training
    with pytest.raises(ValueError, match="attack_train_mode must be a bool"):
        ARDStudent(_ModeProbe(), trained_digits_cnn, attack_train_mode="yes")


def test_teacher_is_frozen_unregistered_and_its_accuracy_logged_once(tmp_path, trained_digits_cnn):
    teacher = copy.deepcopy(trained_digits_cnn).train()
    before = flat_params(teacher)
    model = ARDStudent(SmallCNN(input_size=8), teacher, attack=PGD(eps=0.1, alpha=0.04, steps=2), alpha=0.5)
    student_ids = {id(p) for p in model.net.parameters()}
    assert {id(p) for p in model.parameters()} == student_ids  # the optimizer and DDP see the student only
    assert all(k.startswith("net.") for k in model.state_dict())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    model.train()
    assert not teacher.training
    dm = DigitsDataModule(batch_size=64, seed=0)
    evaluation = RobustnessEvaluation({"pgd20": PGD(eps=0.1, alpha=0.025, steps=20)}, num_samples=128)
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=None,
                       enable_checkpointing=True, logger=pl.loggers.CSVLogger(tmp_path), callbacks=[evaluation])
    trainer.fit(model, datamodule=dm)
    assert torch.equal(flat_params(teacher), before)
    # Clean and PGD-20 accuracy of the *student* come from RobustnessEvaluation, as in the configs.
    x_val, y_val = next(iter(DataLoader(dm.val_dataset, batch_size=128)))
    with torch.no_grad():
        student_clean = float((model.net.eval()(x_val).argmax(1) == y_val).float().mean())
    assert evaluation.results["clean_acc"] == pytest.approx(student_clean, abs=1e-6)
    assert evaluation.results["pgd20_acc"] <= evaluation.results["clean_acc"]
    # val/teacher_acc is the teacher's accuracy on the whole validation set, logged in the first epoch only.
    x, y = next(iter(DataLoader(dm.val_dataset, batch_size=10_000)))
    with torch.no_grad():
        expected = float((teacher(x).argmax(1) == y).float().mean())
    assert model.teacher_accuracy == pytest.approx(expected, abs=1e-6) and expected > 0.8
    metrics = (next(tmp_path.rglob("metrics.csv"))).read_text().splitlines()
    column = metrics[0].split(",").index("val/teacher_acc")
    assert sum(1 for row in metrics[1:] if row.split(",")[column]) == 1
    ckpt = safe_load(next(tmp_path.rglob("*.ckpt")))  # weights-only: hparams are primitives
    assert ckpt["ard"]["teacher_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert not any(k.startswith("_teacher") or "teacher." in k for k in ckpt["state_dict"])
    assert ckpt["hyper_parameters"]["temperature"] == 30.0 and "student" not in ckpt["hyper_parameters"]


def _ordered_loader():
    x, y = load_digits_tensors(8, 1)
    return DataLoader(TensorDataset(x[:160], y[:160]), batch_size=40, shuffle=False)  # 4 batches


def _teacher():
    torch.manual_seed(1)
    return SmallCNN(input_size=8)


def _resumable(mode):
    torch.manual_seed(0)
    return ARDStudent(SmallCNN(input_size=8), _teacher(), attack=PGD(eps=0.1, alpha=0.04, steps=2), temperature=4.0,
                      alpha=0.8, adversarial_mode=mode, free_replays=2,
                      optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9), seed=5)


@pytest.mark.parametrize("mode", ["free", "pgd"])
def test_resume_from_a_mid_training_checkpoint_is_exact(tmp_path, mode):
    full = _resumable(mode)
    _trainer(tmp_path / "a", max_epochs=2).fit(full, train_dataloaders=_ordered_loader())
    half = _resumable(mode)
    _trainer(tmp_path / "b", max_epochs=1, enable_checkpointing=True).fit(half, train_dataloaders=_ordered_loader())
    ckpt = next((tmp_path / "b").rglob("*.ckpt"))
    resumed = _resumable(mode)
    _trainer(tmp_path / "c", max_epochs=2).fit(resumed, train_dataloaders=_ordered_loader(), ckpt_path=str(ckpt))
    assert torch.equal(flat_params(resumed), flat_params(full))
    assert not torch.equal(flat_params(half), flat_params(full))
    if mode == "pgd":
        # Resuming with another teacher is allowed (it is an input) but flagged.
        other = _resumable(mode)
        other.distillation.teacher = SmallCNN(input_size=8).eval()  # the teacher lives in its objective
        with pytest.warns(UserWarning, match="teacher differs"):
            _trainer(tmp_path / "e", max_epochs=2).fit(other, train_dataloaders=_ordered_loader(), ckpt_path=str(ckpt))
    if mode == "free":
        saved = safe_load(ckpt)
        assert saved["adversarial_training"]["free_delta"].shape == (1, 40, 1, 8, 8)
        assert torch.equal(resumed._free_delta, full._free_delta) and full._free_delta.abs().max() > 0.05
        # The carried perturbation is part of the state: dropping it changes the resumed run.
        saved["adversarial_training"].pop("free_delta")
        torch.save(saved, tmp_path / "amnesic.ckpt")
        amnesic = _resumable(mode)
        _trainer(tmp_path / "d", max_epochs=2).fit(amnesic, train_dataloaders=_ordered_loader(),
                                                  ckpt_path=str(tmp_path / "amnesic.ckpt"))
        assert not torch.equal(flat_params(amnesic), flat_params(full))


def test_teacher_from_a_weights_only_checkpoint_and_clear_errors(tmp_path):
    teacher = _teacher()
    # A Lightning checkpoint of a Classifier: the `net.` prefix is found and stripped.
    trainer = _trainer(tmp_path / "t", max_steps=1, enable_checkpointing=True)
    trainer.fit(Classifier(teacher), train_dataloaders=_ordered_loader())
    ckpt = next((tmp_path / "t").rglob("*.ckpt"))
    model = ARDStudent(SmallCNN(input_size=8), str(ckpt), teacher_net=SmallCNN(input_size=8))
    assert torch.equal(flat_params(model.teacher), flat_params(teacher))
    assert model.hparams["teacher"] == str(ckpt)

    torch.save(teacher, tmp_path / "pickled.pt")  # a whole pickled module: not weights-only
    with pytest.raises(CheckpointError, match="not a weights-only"):
        ARDStudent(SmallCNN(input_size=8), str(tmp_path / "pickled.pt"), teacher_net=SmallCNN(input_size=8))
    with pytest.raises(ValueError, match="teacher_net"):
        ARDStudent(SmallCNN(input_size=8), str(ckpt))
    with pytest.raises(CheckpointError, match="does not exist"):
        ARDStudent(SmallCNN(input_size=8), str(tmp_path / "missing.ckpt"), teacher_net=SmallCNN(input_size=8))
    with pytest.raises(ValueError, match="teacher has 5 classes but the student has 10"):
        ARDStudent(SmallCNN(input_size=8), SmallCNN(input_size=8, num_classes=5))
    # A teacher that does not declare num_classes is caught at its first forward.
    anonymous = nn.Sequential(nn.Flatten(), nn.Linear(64, 7))
    model = ARDStudent(SmallCNN(input_size=8), anonymous, attack=PGD(eps=0.1, steps=1))
    x, y = load_digits_tensors(8, 1)
    with pytest.raises(ValueError, match=r"teacher outputs logits of shape \(4, 7\) but the student has 10"):
        model.training_loss(x[:4], y[:4])
    with pytest.raises(ValueError, match="adversarial_mode"):
        ARDStudent(SmallCNN(input_size=8), teacher, adversarial_mode="trades")
    with pytest.raises(ValueError, match="alpha"):
        ARDStudent(SmallCNN(input_size=8), teacher, alpha=1.5)


def _student_and_teacher(trainer, module):
    return torch.cat([flat_params(module), flat_params(module.teacher)])


@pytest.mark.ddp
def test_ddp_two_processes_identical_students_and_unchanged_teacher(tmp_path):
    teacher = _teacher()
    model = ARDStudent(SmallCNN(input_size=8), teacher, attack=PGD(eps=0.1, alpha=0.04, steps=2), alpha=0.5,
                       optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    initial = flat_params(model)
    n_student = initial.numel()
    trainer = ddp_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                          callbacks=[RankGather(tmp_path / "params.pt", _student_and_teacher)])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    gathered = torch.load(tmp_path / "params.pt", weights_only=True)
    assert torch.equal(gathered[0], gathered[1])  # RankGather also asserts it on each rank
    assert not torch.equal(gathered[0, :n_student], initial)  # the student trained
    assert torch.equal(gathered[0, n_student:], flat_params(teacher))  # the teacher did not change


@pytest.mark.ddp
def test_ddp_free_ard_keeps_ranks_identical_and_saves_each_ranks_perturbation(tmp_path):
    teacher = _teacher()
    model = ARDStudent(SmallCNN(input_size=8), teacher, attack=PGD(eps=0.1), adversarial_mode="free", free_replays=2,
                       optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    trainer = ddp_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=1, enable_checkpointing=True,
                          callbacks=[RankGather(tmp_path / "params.pt", _student_and_teacher)])
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    gathered = torch.load(tmp_path / "params.pt", weights_only=True)
    n_student = flat_params(model).numel()
    assert torch.equal(gathered[0], gathered[1]) and torch.equal(gathered[0, n_student:], flat_params(teacher))
    ckpt = safe_load(next(tmp_path.rglob("*.ckpt")))
    # Each rank carries its own perturbation (different data); both are kept for an exact resume.
    delta = ckpt["adversarial_training"]["free_delta"]
    assert delta.shape == (2, 32, 1, 8, 8) and not torch.equal(delta[0], delta[1])
    assert ckpt["global_step"] == 3 * 2 and 0 < ckpt["ard"]["teacher_accuracy"] < 1


def test_teacher_keeps_its_dtype_and_logits_come_back_in_the_students(trained_digits_cnn):
    teacher = copy.deepcopy(trained_digits_cnn)
    model = ARDStudent(SmallCNN(input_size=8).to(torch.float64), teacher, adversarial_mode="clean")
    x = load_digits_tensors(8, 1)[0]
    logits = model.teacher_logits(x[:8].double())
    assert logits.dtype == torch.float64 and next(teacher.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(logits, teacher(x[:8]).double())
