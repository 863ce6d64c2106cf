"""Global Lipschitz bounds: never below the true operator norms (brute force) or the gradients seen."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.certify import lipschitz_bound, lipschitz_radius
from lightning_robust.certify.operator_norms import conv_norm_bound, conv_padding_total, nonneg_operator_norm_bound
from lightning_robust.nets import MLP, ResNet32, SmallCNN


def _matrix_norm(op, shape) -> float:
    """Brute force: build the operator's matrix column by column and take its largest singular value."""
    n = int(torch.tensor(shape).prod())
    cols = op(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, -1)
    return float(torch.linalg.matrix_norm(cols, ord=2))


@pytest.mark.parametrize(("ci", "co", "k", "stride", "pad", "dil", "groups", "side"), [
    (2, 3, 3, 1, 1, 1, 1, 6), (2, 4, 3, 2, 1, 1, 1, 7), (4, 4, 3, 1, 1, 1, 4, 5), (2, 3, 3, 1, 0, 2, 1, 8),
    (3, 6, 5, 2, 2, 1, 3, 9), (1, 2, 2, 1, "same", 1, 1, 6),
])
def test_conv_bound_is_an_upper_bound_and_close(ci, co, k, stride, pad, dil, groups, side):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(co, ci // groups, k, k, generator=g, dtype=torch.float64)
    exact = _matrix_norm(lambda z: F.conv2d(z, w, None, stride, pad, dil, groups), (ci, side, side))
    bound = float(conv_norm_bound(w, (side, side), conv_padding_total(pad, (k, k), (dil, dil)), (dil, dil), groups))
    assert exact <= bound * (1 + 1e-9)
    assert bound <= 1.6 * exact  # the Fourier bound is tight up to boundary effects


def test_conv_bound_is_exact_for_a_circular_convolution():
    # With circular padding the operator is exactly the circulant whose norm the Fourier formula gives.
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = _matrix_norm(lambda z: F.conv2d(F.pad(z, (1, 1, 1, 1), mode="circular"), w), (2, 6, 6))
    assert float(conv_norm_bound(w, (6, 6), (0, 0), (1, 1), 1)) == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize(("op", "shape", "exact"), [
    (lambda z: F.avg_pool2d(z, 2), (6, 6), 0.5),
    (lambda z: F.adaptive_avg_pool2d(z, 1), (4, 4), 0.25),
    (lambda z: F.pad(z, (1, 1, 1, 1)), (3, 3), 1.0),
])
def test_schur_bound_for_nonnegative_operators(op, shape, exact):
    bound = float(nonneg_operator_norm_bound(op, shape, torch.float64, torch.device("cpu")))
    assert _matrix_norm(lambda z: op(z.unsqueeze(1)), shape) == pytest.approx(exact, rel=1e-9)
    assert bound >= exact - 1e-12 and bound == pytest.approx(exact, rel=1e-9)


def test_mlp_bound_is_the_product_of_spectral_norms():
    net = MLP(20, 5, (16, 16)).double()
    lb = lipschitz_bound(net, (20,))
    ws = [m.weight for m in net.modules() if isinstance(m, nn.Linear)]
    prod = torch.linalg.matrix_norm(ws[0], 2) * torch.linalg.matrix_norm(ws[1], 2)
    assert float(lb.network) == pytest.approx(float(prod * torch.linalg.matrix_norm(ws[2], 2)), rel=1e-12)
    # margins use the row difference of the last layer, not sqrt(2) * ||W_last||
    assert float(lb.margin[0, 1]) == pytest.approx(float((ws[2][0] - ws[2][1]).norm() * prod), rel=1e-12)
    assert torch.all(lb.margin.diagonal() == 0)


@pytest.mark.parametrize(("net", "shape"), [
    (SmallCNN(1, 4, 8, pool="max"), (1, 8, 8)), (SmallCNN(1, 4, 8, pool="avg"), (1, 8, 8)),
    (ResNet32(num_classes=4, in_channels=1), (1, 4, 4)),
])
def test_bound_dominates_gradient_norms_and_secants(net, shape):
    net = net.double().eval()
    lb = lipschitz_bound(net, shape)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    out = net(x)
    for i, j in [(0, 1), (2, 3), (1, 3)]:
        grad = torch.autograd.grad((out[:, i] - out[:, j]).sum(), x, retain_graph=True)[0]
        assert float(grad.flatten(1).norm(dim=1).max()) <= float(lb.margin[i, j])
    with torch.no_grad():
        z = x + 0.3 * torch.randn(x.shape, generator=g, dtype=torch.float64)
        ratio = (net(z) - net(x)).norm(dim=1) / (z - x).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= float(lb.network)


def test_lipschitz_radius_values():
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    lmat = torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 1.0], [4.0, 1.0, 0.0]])
    r = lipschitz_radius(logits, torch.tensor([0, 1]), lmat)
    assert r.tolist() == [pytest.approx(0.75), 0.0]  # min(2/2, 3/4); a tie certifies nothing
