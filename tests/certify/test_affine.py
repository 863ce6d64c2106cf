"""The local affine map: exact logits and Jacobian, valid exactly on its polyhedron, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.certify import NotPiecewiseLinearError, local_affine_map, simplex_certificate
from lightning_robust.nets import MLP, MobileNetV2, ResNet32, SmallCNN, WideResNet


def _randomize_bn(net: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.2 - 0.1)
    return net.eval()


# Input side per net: the residual nets run on 4x4 images to keep the forward-mode passes cheap.
SIDE = {"resnet32": 4, "wide_resnet": 4, "mobilenet_v2": 4}
NETS = {
    "mlp": lambda: MLP(64, 10, (32, 32)),
    "cnn_max": lambda: SmallCNN(1, 10, 8, pool="max", mean=[0.5], std=[0.25]),
    "cnn_avg": lambda: SmallCNN(1, 10, 8, pool="avg"),
    "resnet32": lambda: ResNet32(num_classes=10, in_channels=1),
    "wide_resnet": lambda: WideResNet(depth=10, widen_factor=1, in_channels=1),
    "mobilenet_v2": lambda: MobileNetV2(num_classes=10, in_channels=1, width_mult=0.25),
}


def _jacobian(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    jac = torch.autograd.functional.jacobian(lambda z: net(z).sum(0), x)  # [K, B, ...]
    return jac.reshape(jac.shape[0], x.shape[0], -1).transpose(0, 1)


@pytest.mark.parametrize("name", list(NETS))
def test_affine_map_reproduces_logits_and_jacobian(name):
    torch.manual_seed(0)
    net = _randomize_bn(NETS[name]())
    side = SIDE.get(name, 8)
    x = torch.rand(3, 1, side, side)
    amap = local_affine_map(net, x)
    with torch.no_grad():
        logits = net(x)
    scale = logits.abs().max().item() + 1
    assert torch.allclose(amap.logits, logits, atol=1e-5 * scale, rtol=0)
    assert torch.allclose(amap(x), logits, atol=1e-5 * scale, rtol=0)  # W x + b at x itself
    jac = _jacobian(net, x)  # reference: reverse-mode autograd of the real network
    assert torch.allclose(amap.weight, jac, atol=1e-5 * (jac.abs().max().item() + 1), rtol=1e-4)
    assert amap.slack.shape == amap.normal_norm.shape and amap.slack.shape[1] > 0
    assert not net.training  # the network's mode is left as found


def _patterns(net: nn.Module, z: torch.Tensor) -> list[torch.Tensor]:
    """Brute force: the sign pattern of every ReLU input and the winner of every max-pool window at z."""
    out: list[torch.Tensor] = []
    hooks = []
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            hooks.append(m.register_forward_hook(lambda _m, i, _o: out.append(i[0] > 0)))
        if isinstance(m, nn.MaxPool2d):
            hooks.append(m.register_forward_hook(lambda mod, i, _o: out.append(
                F.max_pool2d(i[0], mod.kernel_size, mod.stride, return_indices=True)[1])))
    with torch.no_grad():
        net(z)
    for h in hooks:
        h.remove()
    return out


@pytest.mark.parametrize("name", ["mlp", "cnn_max", "resnet32"])
def test_region_ball_keeps_pattern_and_affine_map(name):
    torch.manual_seed(0)
    net = _randomize_bn(NETS[name]()).double()
    side = SIDE.get(name, 8)
    x = torch.rand(2, 1, side, side, dtype=torch.float64)
    amap = local_affine_map(net, x, keep_normals=True)
    radius = amap.region_radius()
    assert (radius > 0).all()
    base = _patterns(net, x)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        u = torch.randn(x.shape, generator=g, dtype=torch.float64)
        u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        z = x + 0.999 * radius.view(-1, 1, 1, 1) * u * torch.rand(2, 1, 1, 1, generator=g, dtype=torch.float64)
        assert all(torch.equal(a, b) for a, b in zip(base, _patterns(net, z)))
        assert amap.contains(z).all()
        with torch.no_grad():
            assert torch.allclose(amap(z), net(z), atol=1e-9, rtol=0)
    # The region is tight: just across the nearest facet the activation pattern changes (and for the
    # MLP, where every neuron reaches the output, the network is no longer this affine map).
    assert amap.normals is not None
    dist = amap.hyperplane_distance()
    i = dist.argmin(1)
    a = amap.normals[torch.arange(2), i]  # gradient of the binding constraint
    step = -(a / a.norm(dim=1, keepdim=True)).view_as(x)
    z_out = x + (dist.min(1).values.view(-1, 1, 1, 1) * 1.05 + 1e-6) * step
    assert not amap.contains(z_out).any()
    for b in range(2):
        assert not all(torch.equal(p[b], q[b]) for p, q in zip(base, _patterns(net, z_out)))
    if name == "mlp":
        with torch.no_grad():
            assert ((amap(z_out) - net(z_out)).abs().amax(1) > 1e-9).all()


@pytest.mark.parametrize("pool", [nn.MaxPool2d(3, stride=2, padding=1), nn.MaxPool2d(2, dilation=2),
                                  nn.MaxPool2d((2, 3), stride=(1, 2))])
def test_max_pool_variants_are_exact_on_their_region(pool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), pool, nn.Flatten(), nn.LazyLinear(4))
    net(torch.rand(1, 1, 8, 8))
    net = net.double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    amap = local_affine_map(net, x)
    with torch.no_grad():
        assert torch.allclose(amap.logits, net(x)) and torch.allclose(amap(x), net(x))
    radius = amap.region_radius()
    base = _patterns(net, x)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        u = torch.randn(x.shape, generator=g, dtype=torch.float64)
        z = x + 0.999 * radius.view(-1, 1, 1, 1) * u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        assert all(torch.equal(a, b) for a, b in zip(base, _patterns(net, z)))
        with torch.no_grad():
            assert torch.allclose(amap(z), net(z), atol=1e-10, rtol=0)


def test_affine_map_is_differentiable_in_input_and_parameters():
    torch.manual_seed(0)
    net = MLP(4, 3, (5,)).double().eval()
    x = torch.rand(2, 4, dtype=torch.float64, requires_grad=True)
    amap = local_affine_map(net, x)
    (amap.weight.sum() + amap.slack.sum()).backward()
    assert x.grad is not None and net.layers[1].weight.grad is not None
    assert torch.isfinite(x.grad).all()


class _GeluBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.gelu(x))


class _Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


@pytest.mark.parametrize(("net", "where", "what"), [
    (nn.Sequential(nn.Linear(4, 8), nn.Softplus(), nn.Linear(8, 3)), "layer '1' (Softplus)", "softplus"),
    (nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3)), "layer '1' (GELU)", "gelu"),
    (nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3)), "layer '1' (Sigmoid)", "sigmoid"),
    (nn.Sequential(_GeluBlock()), "layer '0' (_GeluBlock)", "gelu"),
    (nn.Sequential(nn.Linear(4, 4), _Square(), nn.Linear(4, 3)), "layer '1' (_Square)", "input-dependent"),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)),
     "layer '1' (BatchNorm1d)", "batch statistics"),
    (nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.MaxPool2d(3, ceil_mode=True, padding=1), nn.Flatten(),
                   nn.Linear(1, 3)), "layer '1' (MaxPool2d)", "ceil_mode"),
])
def test_non_piecewise_linear_layers_raise_naming_the_layer(net, where, what):
    x = torch.rand(2, 4)
    with pytest.raises(NotPiecewiseLinearError) as err:
        local_affine_map(net.eval(), x)
    assert where in str(err.value) and what in str(err.value)
    with pytest.raises(NotPiecewiseLinearError):
        simplex_certificate(net.eval(), x)  # never a number for such a network


def test_bad_arguments():
    net = MLP(4, 3, (5,)).eval()
    with pytest.raises(ValueError, match="chunk_size"):
        local_affine_map(net, torch.rand(2, 4), chunk_size=0)
    with pytest.raises(ValueError, match="x must be"):
        local_affine_map(net, torch.rand(4))
    with pytest.raises(ValueError, match="probes"):
        local_affine_map(net, torch.rand(2, 4), probes=torch.rand(2, 1, 3))


def test_chunking_does_not_change_the_result():
    torch.manual_seed(0)
    net = SmallCNN(1, 10, 8).double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    a, b = local_affine_map(net, x, chunk_size=4096), local_affine_map(net, x, chunk_size=6)
    assert torch.allclose(a.weight, b.weight) and torch.allclose(a.normal_norm, b.normal_norm)
    assert torch.equal(a.slack, b.slack)
