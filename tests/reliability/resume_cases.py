"""Modules and callbacks whose resume exactness the reliability sweep checks (tiny, CPU, a few seconds each).

Each case builds ``(module, datamodule, callbacks)`` from scratch, deterministically. The sweep trains a
case for ``EPOCHS`` epochs straight, and for ``EPOCHS // 2`` epochs plus a checkpoint; a *new process*
resumes that checkpoint to ``EPOCHS`` epochs; the two final checkpoints must be identical.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_robust.attacks import PGD
from lightning_robust.callbacks import DeepKNNPoisonFilter
from lightning_robust.datamodules import (
    ColoredDigitsDataModule,
    DigitsDataModule,
    DomainAdaptationDataModule,
    GaussianMixtureDataModule,
)
from lightning_robust.models import (
    GAN,
    NWGAN,
    ARDStudent,
    Classifier,
    DistilledGAN,
    EntropicGAN,
    InterpretationRegularizedClassifier,
    NWDomainAdaptation,
)
from lightning_robust.nets import (
    MLP,
    DCGANGenerator,
    DigitFeatureExtractor,
    DualCritic,
    LinearGenerator,
    MLPGenerator,
    SmallCNN,
)

EPOCHS = 4
TRAINER_KW: dict[str, Any] = dict(limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0)

Case = Callable[[], tuple[pl.LightningModule, pl.LightningDataModule, list[pl.Callback]]]


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.99))


class _DropoutNet(nn.Module):
    """A digits net that draws from the global RNG every step (dropout): exactness needs the RNG state."""

    num_classes = 10

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, seed=1)


def classifier() -> tuple:
    return Classifier(SmallCNN(input_size=8), optimizer=_sgd), _digits(), []


def classifier_dropout() -> tuple:
    return Classifier(_DropoutNet(), optimizer=_sgd), _digits(), []


def classifier_certified() -> tuple:
    net = MLP(64, 10, hidden=(32,))
    return Classifier(net, optimizer=_sgd, certificate_weight=0.1, certificate_radius=0.3), _digits(), []


def interpretation_regularized() -> tuple:
    net = MLP(64, 10, hidden=(32,))
    return InterpretationRegularizedClassifier(net, saliency_weight=1.0, optimizer=_sgd), _digits(), []


def _mixture() -> GaussianMixtureDataModule:
    return GaussianMixtureDataModule(n_train=256, n_test=64, batch_size=32)


class _ToyG(nn.Module):
    latent_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def gan_wgan_gp_ema() -> tuple:
    d = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    return (GAN(_ToyG(), d, loss="wgan-gp", n_critic=2, ema_decay=0.9, generator_optimizer=_adam,
                discriminator_optimizer=_adam), _mixture(), [])


def entropic_gan() -> tuple:
    g = MLPGenerator(latent_dim=2, out_shape=(2,), hidden=(16,))
    critics = DualCritic(MLP(2, 1, (16,)), MLP(2, 1, (16,)))
    return (EntropicGAN(g, critics, cost="l2", reg=0.5, n_critic=2, likelihood_latents=64,
                        generator_optimizer=partial(torch.optim.Adam, lr=1e-3),
                        discriminator_optimizer=partial(torch.optim.Adam, lr=1e-3)), _mixture(), [])


def classifier_pgd_training() -> tuple:
    # PGD's random start draws from the global RNG: exactness needs RNGStateCheckpoint.
    return Classifier(MLP(64, 10, hidden=(32,)), optimizer=_sgd, attack=PGD(eps=0.1, alpha=0.05, steps=2)), \
        _digits(), []


def classifier_free_training() -> tuple:
    # Free adversarial training carries a perturbation across minibatches; it must be in the checkpoint.
    return (Classifier(MLP(64, 10, hidden=(32,)), optimizer=_sgd, attack=PGD(eps=0.1), adversarial_mode="free",
                       free_replays=2), _digits(), [])


def _teacher() -> nn.Module:
    torch.manual_seed(7)
    return MLP(64, 10, hidden=(16,))


def ard_student_free() -> tuple:
    return (ARDStudent(MLP(64, 10, hidden=(16,)), _teacher(), attack=PGD(eps=0.1), adversarial_mode="free",
                       free_replays=2, temperature=5.0, alpha=0.7, optimizer=_sgd), _digits(), [])


def distilled_gan_joint() -> tuple:
    torch.manual_seed(3)
    teacher = DCGANGenerator(image_size=8, channels=1, latent_dim=8, d=4, dcgan_init=False)
    student = DCGANGenerator(image_size=8, channels=1, latent_dim=8, d=1)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 1))
    dm = DigitsDataModule(image_size=8, batch_size=32, val_fraction=0.0, seed=0)
    return DistilledGAN(teacher, student, critic, alpha=0.3, mode="joint", loss="wgan-gp", n_critic=2), dm, []


def nw_gan() -> tuple:
    opt = partial(torch.optim.RMSprop, lr=2e-3)
    gan = NWGAN(LinearGenerator(hidden=()), MLP(2, 1, hidden=(16,)), num_components=3, latent_dim=2,
                loss="wgan-clip", n_critic=2, proportions_lr=5e-2, generator_optimizer=opt,
                discriminator_optimizer=opt)
    return gan, _mixture(), []


def nw_domain_adaptation() -> tuple:
    # The feature extractor's dropout draws from the global RNG.
    f = DigitFeatureExtractor(image_size=16, dropout=0.2)
    opt = partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.999))
    model = NWDomainAdaptation(f, MLP(f.out_features, 3, (16,)), MLP(f.out_features, 1, (16,)), method="nw",
                               adversarial_every=2, optimizer=opt, critic_optimizer=opt)
    src = ColoredDigitsDataModule(colored=False, half=0, classes=[1, 4, 8], class_proportions=[0.6, 0.3, 0.1],
                                  batch_size=32)
    tgt = ColoredDigitsDataModule(colored=True, half=1, classes=[1, 4, 8], class_proportions=[0.1, 0.3, 0.6],
                                  batch_size=32)
    return model, DomainAdaptationDataModule(src, tgt), []


def poison_filter_callback() -> tuple:
    # The filter's decision (removed indices) and the DataModule's exclusion are checkpointed state.
    dm = DigitsDataModule(batch_size=32, seed=1, with_index=True)
    filt = DeepKNNPoisonFilter(k=10, layer="net.layers.1", filter_epoch=1)
    return Classifier(MLP(64, 10, hidden=(32,)), optimizer=_sgd), dm, [filt]


CASES: dict[str, Case] = {
    "Classifier": classifier,
    "Classifier(dropout net)": classifier_dropout,
    "Classifier(certificate_weight)": classifier_certified,
    "InterpretationRegularizedClassifier": interpretation_regularized,
    "GAN(wgan-gp, ema)": gan_wgan_gp_ema,
    "EntropicGAN": entropic_gan,
    "Classifier(attack=PGD)": classifier_pgd_training,
    "Classifier(adversarial_mode=free)": classifier_free_training,
    "ARDStudent(adversarial_mode=free)": ard_student_free,
    "DistilledGAN(joint)": distilled_gan_joint,
    "NWGAN": nw_gan,
    "NWDomainAdaptation(nw, dropout)": nw_domain_adaptation,
    "Classifier+DeepKNNPoisonFilter": poison_filter_callback,
}
