"""RobustAccuracy: accuracy on attacked inputs, against a direct computation."""

import copy

import pytest
import torch

from lightning_robust.attacks import PGD
from lightning_robust.metrics import RobustAccuracy


def test_matches_direct_computation_over_batches(trained_digits_cnn, digits_tensors):
    net = trained_digits_cnn
    x, y = digits_tensors[0][-200:], digits_tensors[1][-200:]
    attack = PGD(eps=0.1, alpha=0.025, steps=5, random_start=False)
    robust, clean = RobustAccuracy(attack), RobustAccuracy()
    for xb, yb in zip(x.split(64), y.split(64)):
        robust.update(net, xb, yb)
        clean.update(net, xb, yb)
    with torch.no_grad():
        expected = (net(attack(net, x, y)).argmax(1) == y).double().mean()
        expected_clean = (net(x).argmax(1) == y).double().mean()
    assert robust.compute().item() == pytest.approx(expected.item())
    assert clean.compute().item() == pytest.approx(expected_clean.item())
    assert robust.compute() < clean.compute()
    # Precomputed adversarial inputs are counted as given.
    given = RobustAccuracy(attack)
    given.update(net, x, y, x_adv=x)
    assert given.compute().item() == pytest.approx(expected_clean.item())


def test_runs_under_no_grad_and_leaves_train_mode(trained_digits_cnn, digits_tensors):
    net = copy.deepcopy(trained_digits_cnn).train()
    metric = RobustAccuracy(PGD(eps=0.1, steps=2))
    with torch.no_grad():
        metric.update(net, digits_tensors[0][:16], digits_tensors[1][:16])
    assert net.training and metric.total.item() == 16
    with pytest.raises(TypeError, match="attack must be an Attack"):
        RobustAccuracy("pgd")
