"""Training objectives: each term against a reference computation, and their composition rules."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.attacks import PGD, adversarial_training
from lightning_robust.certify import certify
from lightning_robust.nets import MLP
from lightning_robust.objectives import (
    AdversarialTraining,
    CertifiedRadius,
    CrossEntropy,
    Distillation,
    Objective,
    TrainingBatch,
)


class Wrapper(nn.Module):
    """A module with a ``net`` submodule, as the Lightning modules have."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    module = Wrapper(MLP(in_features=16, num_classes=3, hidden=(8,)))
    x = torch.rand(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return module, x, y


def test_cross_entropy_is_torch_cross_entropy(setup):
    module, x, y = setup
    loss, logs = CrossEntropy(weight=0.5, label_smoothing=0.1)(module, TrainingBatch(x, y))
    assert logs == {}
    assert torch.allclose(loss, 0.5 * F.cross_entropy(module(x), y, label_smoothing=0.1))


def test_adversarial_training_trains_later_terms_on_its_examples(setup):
    module, x, y = setup
    attack = PGD(eps=0.1, alpha=0.05, steps=3, random_start=False)
    objectives: list[Objective] = [AdversarialTraining(attack), CertifiedRadius(2.0, method="lipschitz", radius=0.3)]
    batch = TrainingBatch(x, y)
    for o in objectives:
        o.prepare(module, batch)
    (ce, _), (cert, logs) = (o(module, batch) for o in objectives)
    x_adv = attack(module, x, y)
    assert torch.equal(batch.inputs, x_adv)
    assert torch.allclose(ce, F.cross_entropy(module(x_adv), y))
    radius = certify(module.net, x_adv, y, "lipschitz", signed=True)
    assert torch.allclose(cert, 2.0 * F.relu(1 - radius / 0.3).mean())
    assert torch.allclose(logs["certificate"], radius.clamp_min(0).mean())


def test_fast_mode_uses_fgsm_with_random_start_on_the_threat(setup):
    o = AdversarialTraining(PGD(eps=0.2, norm="l2"), mode="fast", fast_alpha=0.1)
    assert o.train_attack is not None and o.train_attack.threat.norm == "l2"
    assert o.train_attack.threat.eps == pytest.approx(0.2) and o.replays == 1


def test_free_mode_replays_and_carries_the_projected_sign_step(setup):
    module, x, y = setup
    attack = PGD(eps=0.05)
    o = AdversarialTraining(attack, mode="free", free_replays=3)
    assert o.replays == 3 and o.train_attack is None
    batch = TrainingBatch(x, y)
    deltas = []
    for r in range(3):
        batch.start_replay(r)
        o.prepare(module, batch)
        assert torch.allclose(batch.inputs, (x + (deltas[-1] if deltas else 0)).clamp(0, 1))
        loss, _ = o(module, batch)
        loss.backward()
        grad = batch.inputs.grad
        before = deltas[-1] if deltas else torch.zeros_like(x)
        o.after_backward(batch)
        expected = adversarial_training.free_delta_update(before, grad, attack)
        assert torch.equal(o.delta, expected)
        deltas.append(expected)
    assert o.delta.abs().max() <= 0.05 + 1e-7
    restored = AdversarialTraining(attack, mode="free")
    restored.load_state_dict({"free_delta": o.state_dict()["free_delta"].unsqueeze(0)})
    assert torch.equal(restored.delta, o.delta)


def test_weight_zero_only_perturbs(setup):
    module, x, y = setup
    o = AdversarialTraining(PGD(eps=0.1, steps=2, random_start=False), weight=0.0)
    batch = TrainingBatch(x, y)
    o.prepare(module, batch)
    loss, _ = o(module, batch)
    assert float(loss) == 0.0 and not torch.equal(batch.inputs, x)


def test_distillation_is_the_ard_equation_by_hand(setup):
    module, x, y = setup
    teacher = MLP(in_features=16, num_classes=3, hidden=(5,))
    o = Distillation(teacher, temperature=4.0, alpha=0.7)
    o.setup(module, 3)
    x_adv = (x + 0.05).clamp(0, 1)
    batch = TrainingBatch(x, y, inputs=x_adv)
    loss, _ = o(module, batch)
    t = F.softmax(teacher(x) / 4.0, dim=1)
    s = F.log_softmax(module(x_adv) / 4.0, dim=1)
    kl = (t * (t.log() - s)).sum(1).mean()
    expected = 0.7 * 16.0 * kl + 0.3 * F.cross_entropy(module(x), y)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="teacher has 3 classes but the student has 4"):
        o.setup(module, 4)


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: CrossEntropy(label_smoothing=1.0), ValueError, "label_smoothing"),
    (lambda: AdversarialTraining("pgd"), TypeError, "attack must be an Attack"),
    (lambda: AdversarialTraining(PGD(), mode="trades"), ValueError, "adversarial_mode must be one of"),
    (lambda: CertifiedRadius(method="exact"), ValueError, "certificate_method"),
    (lambda: CertifiedRadius(net=3), TypeError, "net must be a dotted"),
    (lambda: Distillation(MLP(16, 3, (4,)), temperature=0), ValueError, "temperature"),
])
def test_bad_arguments_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()
