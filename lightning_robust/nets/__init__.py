"""Plain ``nn.Module`` networks (no Lightning imports): images in [0, 1], optional normalization layer."""

from lightning_robust.nets.dcgan import DCGANDiscriminator, DCGANGenerator
from lightning_robust.nets.domain_adaptation import DigitFeatureExtractor, TorchvisionBackbone
from lightning_robust.nets.dual_critic import DualCritic
from lightning_robust.nets.linear_generator import LinearGenerator
from lightning_robust.nets.linear_probe import LinearProbe
from lightning_robust.nets.mlp import MLP
from lightning_robust.nets.mlp_generator import MLPGenerator
from lightning_robust.nets.mnist_gan import MNISTCriticTrunk, MNISTGenerator
from lightning_robust.nets.mobilenet_v2 import MobileNetV2
from lightning_robust.nets.normalize import Normalize
from lightning_robust.nets.registry import available_nets, build_net, register_net
from lightning_robust.nets.resnet import ResNet18, ResNet32
from lightning_robust.nets.small_cnn import SmallCNN
from lightning_robust.nets.text import TransformerClassifier, WordVectorClassifier
from lightning_robust.nets.wide_resnet import WideResNet
from lightning_robust.nets.word_lm import WordLanguageModel

# Each net is registered here once, under its snake_case name (a second registration of the same name
# with another factory is an error in register_net).
for _name, _factory in {
    "dcgan_discriminator": DCGANDiscriminator,
    "dcgan_generator": DCGANGenerator,
    "mlp": MLP,
    "mlp_generator": MLPGenerator,
    "mnist_critic_trunk": MNISTCriticTrunk,
    "mnist_generator": MNISTGenerator,
    "mobilenet_v2": MobileNetV2,
    "resnet18": ResNet18,
    "resnet32": ResNet32,
    "small_cnn": SmallCNN,
    "transformer_classifier": TransformerClassifier,
    "wide_resnet": WideResNet,
    "word_vector_classifier": WordVectorClassifier,
}.items():
    register_net(_name, _factory)

__all__ = [
    "DCGANDiscriminator",
    "DCGANGenerator",
    "DigitFeatureExtractor",
    "DualCritic",
    "LinearGenerator",
    "LinearProbe",
    "MLP",
    "MLPGenerator",
    "MNISTCriticTrunk",
    "MNISTGenerator",
    "MobileNetV2",
    "Normalize",
    "ResNet18",
    "ResNet32",
    "SmallCNN",
    "TorchvisionBackbone",
    "TransformerClassifier",
    "WideResNet",
    "WordLanguageModel",
    "WordVectorClassifier",
    "available_nets",
    "build_net",
    "register_net",
]
