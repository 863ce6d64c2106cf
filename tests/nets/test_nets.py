import pytest
import torch
from torch import nn

from lightning_robust.nets import (
    MLP,
    MobileNetV2,
    Normalize,
    ResNet18,
    ResNet32,
    SmallCNN,
    WideResNet,
    available_nets,
    build_net,
)


@pytest.mark.parametrize(("size", "channels"), [(8, 1), (28, 1), (32, 3)])
def test_small_cnn_adapts_to_input_size(size, channels):
    net = SmallCNN(in_channels=channels, num_classes=7, input_size=size)
    assert net(torch.rand(3, channels, size, size)).shape == (3, 7)


def test_reference_parameter_counts():
    # Published sizes: ResNet-18 (CIFAR) 11.17M, ResNet-32 0.46M, WRN-34-10 46.16M, MobileNetV2 2.24M.
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ResNet18()) == 11_173_962
    assert count(ResNet32()) == 464_154
    assert count(WideResNet(34, 10)) == 46_160_474
    assert count(MobileNetV2()) == 2_237_770


@pytest.mark.parametrize("net", [ResNet32(), WideResNet(depth=10, widen_factor=1), MobileNetV2(width_mult=0.25),
                                 ResNet18(width=8)])
def test_cifar_nets_shapes(net):
    assert net.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_normalization_layer_is_first_and_exact():
    mean, std = (0.5,), (0.25,)
    plain = SmallCNN(input_size=8)
    normed = SmallCNN(input_size=8, mean=mean, std=std)
    normed.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(normed(x), plain((x - 0.5) / 0.25), atol=1e-6)
    assert isinstance(normed.normalize, Normalize)
    assert set(normed.state_dict()) - set(plain.state_dict()) == {"normalize.mean", "normalize.std"}


def test_mlp_on_images_and_flat_input():
    net = MLP(in_features=64, hidden=(16,), num_classes=3)
    x = torch.rand(5, 1, 8, 8)
    assert torch.equal(net(x), net(x.flatten(1)))
    with pytest.raises(ValueError, match="expects 64 input features"):
        net(torch.rand(2, 10))


def test_feature_layer_names_resolve():
    for net in (SmallCNN(input_size=8), MLP(64, 10, (8, 8)), ResNet32(), MobileNetV2(width_mult=0.25)):
        assert isinstance(net.get_submodule(net.feature_layer), nn.Module)


def test_only_relu_activations_in_piecewise_linear_nets():
    # Certificates and closed-form Hessians rely on nn.ReLU modules (no functional or smooth activations).
    for net in (SmallCNN(input_size=8), MLP(64, 10), ResNet18(width=8), ResNet32(), WideResNet(10, 1)):
        acts = {type(m) for m in net.modules() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.GELU, nn.Softplus, nn.SiLU))}
        assert acts == {nn.ReLU}


def test_registry_and_unknown_name():
    assert {"small_cnn", "resnet18", "resnet32", "wide_resnet", "mobilenet_v2", "mlp"} <= set(available_nets())
    net = build_net("small_cnn", input_size=8)
    assert isinstance(net, SmallCNN)
    with pytest.raises(ValueError, match=r"unknown net name 'resnet81'.*did you mean 'resnet18'"):
        build_net("resnet81")


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: SmallCNN(input_size=30), "input_size must be a positive multiple of 4"),
        (lambda: SmallCNN(num_classes=0), "num_classes must be a positive integer"),
        (lambda: SmallCNN(pool="median"), "pool must be one of"),
        (lambda: WideResNet(depth=33), "depth must be of the form 6n \\+ 4"),
        (lambda: MLP(hidden=(16, -1)), r"hidden\[1\] must be a positive integer"),
        (lambda: Normalize((0.5,), (0.0,)), "std must be positive"),
        (lambda: SmallCNN(mean=(0.5,)), "mean and std must be given together"),
    ],
)
def test_bad_arguments_name_the_argument(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()
