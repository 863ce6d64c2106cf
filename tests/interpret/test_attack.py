"""The top-k saliency attack and the softplus surrogate (arXiv 1905.12105, Appendix D)."""

import pytest
import torch
from torch import nn

from lightning_robust.interpret import (
    RandomSearchSaliencyAttack,
    TopKSaliencyAttack,
    gradient_saliency,
    softplus_surrogate,
    topk_mask,
    topk_saliency_mass,
)
from lightning_robust.nets import MLP


def test_softplus_surrogate_swaps_relus_and_always_restores():
    torch.manual_seed(0)
    net = MLP(16, 4, (8, 8))
    net.layers[2].inplace = True
    x = torch.randn(5, 16)
    twin = nn.Sequential(*[nn.Softplus(beta=5.0) if isinstance(m, nn.ReLU) else m for m in net.layers])
    before = net(x)
    with softplus_surrogate(net, beta=5.0):
        assert torch.allclose(net(x), twin(x))
        assert not net.layers[2].inplace
    assert torch.equal(net(x), before) and net.layers[2].inplace
    with pytest.raises(RuntimeError), softplus_surrogate(net, beta=5.0):
        raise RuntimeError("boom")
    assert torch.equal(net(x), before)
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(ValueError, match="beta must be a positive number, got 0"), softplus_surrogate(net, 0):
        pass


def test_relu_saliency_has_zero_input_gradient_which_the_surrogate_fixes(trained_digits_cnn, digits_tensors):
    x = digits_tensors[0][-8:]
    cls = trained_digits_cnn(x).argmax(1)
    mask = topk_mask(gradient_saliency(trained_digits_cnn, x, cls), 16)
    relu = TopKSaliencyAttack(softplus_beta=None)._objective_grad(trained_digits_cnn, x, cls, mask)
    smooth = TopKSaliencyAttack(softplus_beta=10.0)._objective_grad(trained_digits_cnn, x, cls, mask)
    assert relu.abs().max() == 0  # piecewise-linear net: the map is locally constant in x
    assert smooth.flatten(1).norm(dim=1).min() > 0


def test_attack_keeps_prediction_stays_in_ball_and_beats_random_noise(trained_digits_cnn, digits_tensors):
    net = trained_digits_cnn
    x, y = digits_tensors[0][-48:], digits_tensors[1][-48:]
    eps = 1.0
    attack = TopKSaliencyAttack(eps=eps, steps=10, restarts=1, search_steps=20)
    x_adv = attack(net, x, y, generator=torch.Generator().manual_seed(0))
    pred = net(x).argmax(1)
    moved = (x_adv != x).flatten(1).any(1)
    assert moved.float().mean() > 0.8
    assert attack.threat.contains(x_adv, x).all()
    assert torch.equal(net(x_adv).argmax(1), pred)
    k = attack.num_top(64)
    mask = topk_mask(gradient_saliency(net, x, pred), k)
    mass_adv = topk_saliency_mass(gradient_saliency(net, x_adv, pred), mask)
    # Random perturbations of the same size (keeping the prediction) remove much less saliency mass.
    g = torch.Generator().manual_seed(1)
    d = torch.randn(x.shape, generator=g)
    x_rand = attack.threat.project(x + eps * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1), x)
    keep = moved & (net(x_rand).argmax(1) == pred)
    mass_rand = topk_saliency_mass(gradient_saliency(net, x_rand, pred), mask)
    assert mass_adv[keep].mean() < mass_rand[keep].mean() - 0.05


def test_attack_returns_input_where_no_start_keeps_the_prediction(tiny_images):
    class Flip(nn.Module):
        """Class 0 at exactly x0, class 1 anywhere else."""

        def __init__(self, x0):
            super().__init__()
            self.x0 = x0

        def forward(self, x):
            same = (x == self.x0).flatten(1).all(1).double()
            w = x.flatten(1).sum(1, keepdim=True) * 0
            return torch.stack([same, 1 - same], 1) + w

    x, y = tiny_images
    x = x[:1].double()
    out = TopKSaliencyAttack(eps=0.5, steps=2, restarts=2, search_steps=3)(Flip(x), x, y[:1])
    assert torch.equal(out, x)


def test_attack_argument_errors():
    with pytest.raises(ValueError, match="eps must be a positive number, got 0"):
        TopKSaliencyAttack(eps=0)
    with pytest.raises(ValueError, match=r"k_fraction must lie in \(0, 1\], got 1.5"):
        TopKSaliencyAttack(k_fraction=1.5)
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        TopKSaliencyAttack(steps=0)
    with pytest.raises(ValueError, match="k must be at most the number of input features 64, got 100"):
        TopKSaliencyAttack(k=100).num_top(64)


def test_random_search_is_monotone_in_draws_and_keeps_the_contract(trained_digits_cnn, digits_tensors):
    net = trained_digits_cnn
    x = digits_tensors[0][-32:]
    pred = net(x).argmax(1)
    mask = topk_mask(gradient_saliency(net, x, pred), 16)
    mass_x = topk_saliency_mass(gradient_saliency(net, x, pred), mask)
    masses = []
    for draws in (1, 8, 40):
        attack = RandomSearchSaliencyAttack(eps=1.0, k=16, draws=draws, batch_draws=1)
        x_adv = attack(net, x, pred, generator=torch.Generator().manual_seed(0))
        assert attack.threat.contains(x_adv, x).all()
        assert torch.equal(net(x_adv).argmax(1), pred)
        moved = (x_adv != x).flatten(1).any(1)
        # Moved samples lie on the sphere of radius eps (up to box clipping, which only shortens).
        assert ((x_adv - x).flatten(1).norm(dim=1)[moved] <= 1.0 + 1e-5).all()
        masses.append(topk_saliency_mass(gradient_saliency(net, x_adv, pred), mask))
    # Never worse than x, and the first draws are shared: more draws never do worse.
    assert (masses[0] <= mass_x + 1e-6).all()
    assert (masses[1] <= masses[0] + 1e-6).all() and (masses[2] <= masses[1] + 1e-6).all()
    assert (masses[2] < mass_x - 1e-3).float().mean() > 0.8
    # Batching draws changes nothing but memory: one sample's result does not depend on the others.
    one = RandomSearchSaliencyAttack(eps=1.0, k=16, draws=8, radius="ball", batch_draws=8)
    ball = one(net, x, pred, generator=torch.Generator().manual_seed(0))
    assert ((ball - x).flatten(1).norm(dim=1) <= 1.0 + 1e-5).all()


def test_random_search_returns_input_where_every_draw_flips_the_class(tiny_images):
    class Flip(nn.Module):
        def __init__(self, x0):
            super().__init__()
            self.x0 = x0

        def forward(self, x):
            same = (x == self.x0).flatten(1).all(1).double()
            return torch.stack([same, 1 - same], 1) + x.flatten(1).sum(1, keepdim=True) * 0

    x, y = tiny_images
    x = x[:2].double()
    assert torch.equal(RandomSearchSaliencyAttack(eps=0.5, draws=5)(Flip(x[:1]), x[:1], y[:1]), x[:1])
    with pytest.raises(ValueError, match="radius must be one of"):
        RandomSearchSaliencyAttack(radius="cube")
    with pytest.raises(ValueError, match="draws must be a positive integer, got 0"):
        RandomSearchSaliencyAttack(draws=0)
