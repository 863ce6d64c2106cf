"""TRADES (arXiv 1901.08573): the robustness term against the authors' formula, computed by hand."""

import pytest
import torch
import torch.nn.functional as F

from lightning_robust.nets import MLP
from lightning_robust.objectives import TRADES, CrossEntropy, TrainingBatch


def _setup():
    torch.manual_seed(0)
    net = MLP(in_features=16, num_classes=3, hidden=(8,))
    x = torch.rand(6, 1, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    return net, x, y


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_trades_term_is_the_batch_mean_kl_at_a_point_of_the_ball_that_raises_it(norm):
    net, x, y = _setup()
    o = TRADES(beta=6.0, eps=0.1, step_size=0.03, steps=5, norm=norm)
    batch = TrainingBatch(x, y, generator=torch.Generator().manual_seed(1))
    loss, logs = o(net, batch)
    x_adv = batch.cache["trades_inputs"]
    assert bool(o.threat.contains(x_adv, x).all())
    p = F.softmax(net(x), dim=1)
    log_q = F.log_softmax(net(x_adv), dim=1)
    kl_by_hand = (p * (p.log() - log_q)).sum() / x.shape[0]  # the authors' KLDivLoss(sum) / batch_size
    assert torch.allclose(loss, 6.0 * kl_by_hand, atol=1e-6)
    assert torch.allclose(logs["trades_kl"], kl_by_hand, atol=1e-6)
    # the ascent found a larger KL than its starting point x + 0.001 N(0, I)
    start = x + 0.001 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    kl_start = (p * (p.log() - F.log_softmax(net(o.threat.project(start, x)), dim=1))).sum() / x.shape[0]
    assert kl_by_hand > kl_start
    # gradients reach the weights through both f(x) and f(x')
    loss.backward()
    assert all(q.grad is not None for q in net.parameters())


def test_trades_composes_with_cross_entropy_and_beta_zero_is_plain_training():
    net, x, y = _setup()
    batch = TrainingBatch(x, y)
    ce, _ = CrossEntropy()(net, batch)
    zero, logs = TRADES(beta=0.0)(net, batch)
    assert float(zero) == 0.0 and logs == {}
    assert torch.allclose(ce, F.cross_entropy(net(x), y))
    with pytest.raises(ValueError, match="norm"):
        TRADES(norm="l1")
