"""The Attack contract (attacks/base.py) on PGD and FGSM."""

import pytest
import torch

from lightning_robust.attacks import FGSM, PGD, ThreatModel, attack_loss

ATTACKS = [
    PGD(eps=0.1, alpha=0.02, steps=5),
    PGD(eps=0.5, steps=5, norm="l2", restarts=2),
    FGSM(eps=0.1),
    FGSM(eps=0.1, random_start=True),
]


@pytest.mark.parametrize("attack", ATTACKS, ids=repr)
def test_within_budget_and_bounds(attack, trained_digits_cnn, digits_tensors):
    x, y = digits_tensors[0][-64:], digits_tensors[1][-64:]
    x_adv = attack(trained_digits_cnn, x, y)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert attack.threat.contains(x_adv, x, tol=1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("attack", ATTACKS, ids=repr)
def test_mode_and_grads_left_as_found_and_works_under_inference_mode(attack, tiny_images):
    from lightning_robust.nets import SmallCNN

    net = SmallCNN(input_size=8).train()
    net.classifier[0].eval()  # a mixed-mode model must come back mixed
    x, y = tiny_images
    net(x).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    with torch.inference_mode():
        x_adv = attack(net, x, y)
    assert net.training and not net.classifier[0].training
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert attack.threat.contains(x_adv, x).all()


def test_eps_zero_returns_input(tiny_cnn, tiny_images):
    x, y = tiny_images
    assert torch.equal(PGD(eps=0.0, steps=3)(tiny_cnn, x, y), x)


def test_pgd_at_least_as_strong_as_fgsm_and_grows_with_eps(trained_digits_cnn, digits_tensors):
    x, y = digits_tensors[0][-300:], digits_tensors[1][-300:]

    def acc(attack):
        return (trained_digits_cnn(attack(trained_digits_cnn, x, y)).argmax(1) == y).float().mean().item()

    clean = (trained_digits_cnn(x).argmax(1) == y).float().mean().item()
    accs = [acc(PGD(eps=e, alpha=e / 4, steps=10, random_start=False)) for e in (0.05, 0.1, 0.2)]
    assert clean > accs[0] >= accs[1] >= accs[2]
    assert accs[1] <= acc(FGSM(eps=0.1))


def test_cw_margin_loss_matches_definition():
    logits = torch.tensor([[2.0, 1.0, 0.5], [0.1, 3.0, -1.0]])
    y = torch.tensor([0, 2])
    assert torch.allclose(attack_loss(logits, y, "cw"), torch.tensor([1.0 - 2.0, 3.0 - (-1.0)]))
    t = torch.tensor([1, 1])
    assert torch.allclose(attack_loss(logits, t, "cw", targeted=True), torch.tensor([1.0 - 2.0, 3.0 - 0.1]))


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: PGD(eps=-0.1), "eps must be a non-negative number"),
        (lambda: PGD(norm="l3"), "norm must be one of"),
        (lambda: PGD(steps=0), "steps must be a positive integer"),
        (lambda: PGD(loss="hinge"), "loss must be one of"),
        (lambda: ThreatModel("linf", 0.1, low=1.0, high=0.0), "low must be smaller than high"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_input_outside_unit_interval_is_rejected(tiny_cnn):
    with pytest.raises(ValueError, match=r"x must lie in \[0.0, 1.0\]"):
        PGD()(tiny_cnn, torch.full((2, 1, 8, 8), 2.0), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="y must have shape"):
        PGD()(tiny_cnn, torch.rand(2, 1, 8, 8), torch.tensor([0]))
