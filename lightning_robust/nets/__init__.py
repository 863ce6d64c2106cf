"""Plain ``nn.Module`` networks (no Lightning imports): images in [0, 1], optional normalization layer."""

from lightning_robust.nets.dcgan import DCGANDiscriminator, DCGANGenerator
from lightning_robust.nets.mlp import MLP
from lightning_robust.nets.mobilenet_v2 import MobileNetV2
from lightning_robust.nets.normalize import Normalize
from lightning_robust.nets.registry import available_nets, build_net, register_net
from lightning_robust.nets.resnet import ResNet18, ResNet32
from lightning_robust.nets.small_cnn import SmallCNN
from lightning_robust.nets.wide_resnet import WideResNet

for _name, _factory in {
    "dcgan_discriminator": DCGANDiscriminator,
    "dcgan_generator": DCGANGenerator,
    "mlp": MLP,
    "mobilenet_v2": MobileNetV2,
    "resnet18": ResNet18,
    "resnet32": ResNet32,
    "small_cnn": SmallCNN,
    "wide_resnet": WideResNet,
}.items():
    register_net(_name, _factory)

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "MLP",
    "MobileNetV2",
    "Normalize",
    "ResNet18",
    "ResNet32",
    "SmallCNN",
    "WideResNet",
    "available_nets",
    "build_net",
    "register_net",
]
