"""Plain ``nn.Module`` networks (no Lightning imports): images in [0, 1], optional normalization layer."""

from lightning_robust.nets.domain_adaptation import DigitFeatureExtractor, TorchvisionBackbone
from lightning_robust.nets.linear_generator import LinearGenerator
from lightning_robust.nets.mlp import MLP
from lightning_robust.nets.mobilenet_v2 import MobileNetV2
from lightning_robust.nets.normalize import Normalize
from lightning_robust.nets.registry import available_nets, build_net, register_net
from lightning_robust.nets.resnet import ResNet18, ResNet32
from lightning_robust.nets.small_cnn import SmallCNN
from lightning_robust.nets.wide_resnet import WideResNet

for _name, _factory in {
    "mlp": MLP,
    "mobilenet_v2": MobileNetV2,
    "resnet18": ResNet18,
    "resnet32": ResNet32,
    "small_cnn": SmallCNN,
    "wide_resnet": WideResNet,
}.items():
    register_net(_name, _factory)

__all__ = [
    "DigitFeatureExtractor",
    "LinearGenerator",
    "MLP",
    "MobileNetV2",
    "Normalize",
    "ResNet18",
    "ResNet32",
    "SmallCNN",
    "TorchvisionBackbone",
    "WideResNet",
    "available_nets",
    "build_net",
    "register_net",
]
