"""Saliency maps, SmoothGrad and the sparsified-SmoothGrad certificate (arXiv 1905.12105)."""

import math

import pytest
import torch
from torch import nn

from lightning_robust.interpret import (
    certified_topk_intersection,
    gradient_saliency,
    hoeffding_error,
    scaled_smoothgrad,
    smoothgrad,
    sparsified_smoothgrad,
    sparsify_saliency,
    topk_intersection,
    topk_mask,
)


class CountingNet(nn.Module):
    """Wraps a net and records the batch size of every forward call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.sizes = net, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return self.net(x)


def _linear_net(d=64, c=10, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, c)).double()


def test_gradient_saliency_matches_captum(trained_digits_cnn, digits_tensors):
    from captum.attr import Saliency

    x, y = digits_tensors[0][-12:], digits_tensors[1][-12:]
    ours = gradient_saliency(trained_digits_cnn, x, y)
    ref = Saliency(trained_digits_cnn).attribute(x, target=y, abs=False)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(gradient_saliency(trained_digits_cnn, x, y, absolute=True), ref.abs(), atol=1e-6)
    # target=None explains the predicted class.
    pred = trained_digits_cnn(x).argmax(1)
    assert torch.allclose(gradient_saliency(trained_digits_cnn, x), Saliency(trained_digits_cnn).attribute(
        x, target=pred, abs=False), atol=1e-6)


def test_smoothgrad_matches_captum_noise_tunnel_statistically(trained_digits_cnn, digits_tensors):
    """Both are Monte-Carlo means of the same quantity: their difference must be pure sampling noise."""
    from captum.attr import NoiseTunnel, Saliency

    net = trained_digits_cnn
    x, y = digits_tensors[0][-6:], digits_tensors[1][-6:]
    n, sigma = 400, 0.2
    ours = smoothgrad(net, x, y, n_samples=n, sigma=sigma, batch_size=128, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    ref = NoiseTunnel(Saliency(net)).attribute(x, nt_type="smoothgrad", nt_samples=n, nt_samples_batch_size=50,
                                               stdevs=sigma, target=y, abs=False)
    # Per-element variance of one noisy gradient, from an independent brute-force sample.
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([gradient_saliency(net, x + sigma * torch.randn(x.shape, generator=g), y) for _ in range(300)])
    se = (2 * draws.var(0) / n).sqrt()
    live = se > 1e-8
    z = (ours - ref)[live] / se[live]
    assert live.float().mean() > 0.9
    assert 0.7 < z.pow(2).mean().item() < 1.4  # chi-square / M with M ~ 380: mean 1, sd ~0.07
    assert z.abs().max().item() < 5.5
    assert torch.allclose(ours[~live], ref[~live], atol=1e-6)
    # And both differ clearly from the plain gradient (the smoothing does something).
    assert (ours - gradient_saliency(net, x, y)).abs().mean() > 5 * se.mean()


@pytest.mark.parametrize("batch_size", [1, 3, 7, 1000])
def test_batching_assigns_draws_to_the_right_images_and_bounds_memory(batch_size):
    # A linear model has the same gradient W[t] at every noisy point, so every estimator is exact.
    net = CountingNet(_linear_net())
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0, 3, 3, 7, 9])
    W = net.net[1].weight.detach()
    expected = W[t].view(5, 1, 8, 8)
    sg = smoothgrad(net, x, t, n_samples=7, sigma=0.3, batch_size=batch_size)
    assert torch.allclose(sg, expected, atol=1e-12)
    assert max(net.sizes) <= batch_size and sum(net.sizes) == 35  # targets given: no extra prediction call
    sp = sparsified_smoothgrad(net, x, t, n_samples=7, sigma=0.3, tau=0.1, batch_size=batch_size)
    assert torch.equal(sp, sparsify_saliency(expected, 0.1))
    assert sp.flatten(1).sum(1).eq(6).all()  # floor(0.1 * 64) ones per map
    sc = scaled_smoothgrad(net, x, t, n_samples=7, sigma=0.3, batch_size=batch_size)
    assert torch.allclose(sc, expected.abs() / expected.abs().flatten(1).amax(1).view(5, 1, 1, 1))


def test_sparsified_values_are_frequencies_and_model_state_untouched(trained_digits_cnn, digits_tensors):
    net = trained_digits_cnn
    x = digits_tensors[0][:3]
    net(x).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    with torch.inference_mode():  # as inside a validation loop
        s = sparsified_smoothgrad(net, x, n_samples=20, sigma=0.1, tau=0.25)
    assert not net.training
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    for p in net.parameters():
        p.grad = None
    # Each value is (number of draws ranking the pixel in the top 16) / 20, and each draw gives 16 ones.
    assert torch.allclose(s * 20, (s * 20).round(), atol=1e-5)
    assert torch.allclose(s.flatten(1).sum(1), torch.full((3,), 16.0), atol=1e-4)


def test_argument_errors(tiny_cnn, tiny_images):
    x, _ = tiny_images
    with pytest.raises(ValueError, match="n_samples must be a positive integer, got 0"):
        smoothgrad(tiny_cnn, x, n_samples=0)
    with pytest.raises(ValueError, match="sigma must be a positive number, got 0"):
        smoothgrad(tiny_cnn, x, sigma=0)
    with pytest.raises(ValueError, match=r"sigma must be a positive number, got -0\.1"):
        sparsified_smoothgrad(tiny_cnn, x, sigma=-0.1)
    with pytest.raises(ValueError, match=r"tau must lie in \(0, 1\], got 0"):
        sparsified_smoothgrad(tiny_cnn, x, tau=0)
    with pytest.raises(ValueError, match=r"target must be None, an int or an integer tensor of shape \[16\]"):
        smoothgrad(tiny_cnn, x, target=torch.zeros(3, dtype=torch.long))
    s = torch.rand(2, 64)
    for k in (0, 65, 2.5):
        with pytest.raises(ValueError, match=rf"k must be an integer in \(0, 64\].*got {k}"):
            certified_topk_intersection(s, k, 0.1, sigma=0.2, n_samples=100)
    with pytest.raises(ValueError, match="values must lie in"):
        certified_topk_intersection(s * 3, 5, 0.1, sigma=0.2, n_samples=100)
    with pytest.raises(ValueError, match="radius must be a non-negative number"):
        certified_topk_intersection(s, 5, -0.1, sigma=0.2, n_samples=100)
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        certified_topk_intersection(s, 5, 0.1, sigma=0.2, n_samples=0)
    with pytest.raises(ValueError, match=r"k must be an integer in \(0, 64\]"):
        topk_mask(s, 0)


def test_topk_intersection_matches_python_sets():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 30, generator=g), torch.randn(20, 30, generator=g)
    for k in (1, 7, 30):
        got = topk_intersection(a, b, k)
        for i in range(20):
            sa = set(a[i].abs().argsort(descending=True)[:k].tolist())
            sb = set(b[i].abs().argsort(descending=True)[:k].tolist())
            assert got[i].item() == len(sa & sb)


def _worst_case_overlap(v, k, radius, sigma):
    """Brute force: the adversary pushes every top-k value to its lower bound, every other one to its upper."""
    from scipy.stats import norm

    order = v.argsort(descending=True)
    top = set(order[:k].tolist())
    z = norm.ppf(v.numpy())
    shift = radius / sigma
    moved = [norm.cdf(z[i] - shift) if i in top else norm.cdf(z[i] + shift) for i in range(len(v))]
    new_top = set(sorted(range(len(v)), key=lambda i: -moved[i])[:k])
    return len(top & new_top)


@pytest.mark.parametrize(("d", "k"), [(40, 10), (40, 25), (12, 12), (64, 1)])
def test_exact_certificate_equals_the_worst_case_of_the_smoothing_bound(d, k):
    """With exact expectations, the certificate is tight for the coordinate-wise Lipschitz bound."""
    g = torch.Generator().manual_seed(d + k)
    v = torch.rand(6, d, generator=g, dtype=torch.float64) * 0.98 + 0.01
    radii = [0.0, 0.02, 0.05, 0.1, 0.3, 1.0]
    cert = certified_topk_intersection(v, k, radii, sigma=0.25, n_samples=None)
    assert cert.shape == (6, len(radii))
    for i in range(6):
        for j, r in enumerate(radii):
            assert cert[i, j].item() == _worst_case_overlap(v[i], k, r, 0.25), (i, r)
    assert (cert[:, :-1] >= cert[:, 1:]).all() and (cert[:, 0] == k).all()


def test_sampling_correction_only_lowers_the_certificate():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(8, 100, generator=g)
    exact = certified_topk_intersection(v, 20, 0.05, sigma=0.2, n_samples=None)
    for n in (10_000, 1000, 100):
        cert = certified_topk_intersection(v, 20, 0.05, sigma=0.2, n_samples=n)
        assert (cert <= exact).all()
        exact = cert
    assert hoeffding_error(100, 1000, 0.95) == pytest.approx(math.sqrt(math.log(2 * 100 / 0.05) / 2000))


@pytest.mark.slow
def test_certificate_never_exceeds_monte_carlo_overlap_under_random_perturbations(trained_digits_cnn,
                                                                                  digits_tensors):
    """Random L2 perturbations of the certified radius keep at least the certified top-k overlap.

    The Monte-Carlo maps at the perturbed points are themselves estimates: entries within their Hoeffding
    error of the k-th value may be ranked either way, so that many are allowed as slack (the stated error).
    """
    net = trained_digits_cnn
    x = digits_tensors[0][-3:]
    sigma, tau, k, n, r = 0.2, 0.2, 16, 2048, 0.1
    target = net(x).argmax(1)
    gen = torch.Generator().manual_seed(0)
    base = sparsified_smoothgrad(net, x, target, n_samples=n, sigma=sigma, tau=tau, batch_size=1024, generator=gen)
    cert = certified_topk_intersection(base, k, r, sigma, n_samples=n, confidence=0.95)
    assert cert.min() >= 4  # non-trivial certificates at this radius
    err = hoeffding_error(64, n, 0.95)
    for _ in range(2):
        delta = torch.randn(x.shape, generator=gen)
        delta = r * delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        moved = sparsified_smoothgrad(net, x + delta, target, n_samples=n, sigma=sigma, tau=tau, batch_size=1024,
                                      generator=gen)
        observed = topk_intersection(base, moved, k)
        kth = moved.flatten(1).sort(1, descending=True).values[:, k - 1:k]
        slack = ((moved.flatten(1) - kth).abs() <= 2 * err).sum(1)
        assert (cert <= observed + slack).all(), (cert, observed, slack)
        assert (cert <= observed).float().mean() >= 0.75


def test_default_batch_size_follows_the_input_size_and_changes_no_result():
    from lightning_robust.interpret.saliency import AUTO_BATCH_ELEMENTS, auto_batch_size

    # Memory-bounded: at most the element budget per forward (one input at least), never more than needed.
    assert auto_batch_size(torch.zeros(4, 1, 8, 8), 50) == 200
    big = torch.zeros(2, 3, 224, 224)
    assert auto_batch_size(big, 50) == AUTO_BATCH_ELEMENTS // big[0].numel()
    assert auto_batch_size(big, 50) * big[0].numel() <= AUTO_BATCH_ELEMENTS
    assert auto_batch_size(torch.zeros(1, AUTO_BATCH_ELEMENTS * 2), 3) == 1
    # The noise is drawn in the same order whatever the chunking, so the default call equals the
    # one-noisy-input-at-a-time computation (up to float summation order).
    from lightning_robust.nets import SmallCNN

    torch.manual_seed(0)
    net = CountingNet(SmallCNN(input_size=8).double().eval())
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 3, 7])
    for fn in (smoothgrad, scaled_smoothgrad, sparsified_smoothgrad):
        net.sizes.clear()
        auto = fn(net, x, target, n_samples=20, generator=torch.Generator().manual_seed(1))
        assert net.sizes == [60]  # all 3 x 20 noisy copies in one pass
        one = fn(net, x, target, n_samples=20, batch_size=1, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(auto, one, atol=1e-10), fn.__name__
