"""DistilledGAN: loss formulas, frozen teacher, checkpoint loading, compression ratio, resume."""

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn

from lightning_robust.callbacks import GANEvaluation, SampleGrid
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.models import GAN, DistilledGAN
from lightning_robust.models.distilled_gan import compression_ratio, distillation_loss
from lightning_robust.nets import DCGANDiscriminator, DCGANGenerator
from lightning_robust.utils import CheckpointError
from tests.helpers.ddp import RankGather, ddp_trainer, flat_params, single_trainer

LATENT = 8


def teacher_net(seed: int = 0) -> DCGANGenerator:
    # PyTorch's default initialisation (not DCGAN's N(0, 0.02)) gives a random teacher with varied images.
    torch.manual_seed(seed)
    return DCGANGenerator(image_size=8, channels=1, latent_dim=LATENT, d=6, dcgan_init=False)


def student_net(seed: int = 1) -> DCGANGenerator:
    torch.manual_seed(seed)
    return DCGANGenerator(image_size=8, channels=1, latent_dim=LATENT, d=1)


def digits(test_fraction: float = 0.5) -> DigitsDataModule:
    return DigitsDataModule(image_size=8, batch_size=64, val_fraction=0.0, test_fraction=test_fraction, seed=0)


def brute_force_count(module: nn.Module) -> int:
    total = 0
    for p in module.parameters():
        n = 1
        for s in p.shape:
            n *= s
        total += n
    return total


class LinearCritic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.flatten(1)).flatten()


def test_compression_ratio_is_parameter_count_ratio():
    t, s = teacher_net(), student_net()
    model = DistilledGAN(t, s)
    assert model.teacher_params == brute_force_count(t) and model.student_params == brute_force_count(s)
    assert model.compression_ratio == pytest.approx(brute_force_count(t) / brute_force_count(s), rel=1e-12)
    assert compression_ratio(t, s) == model.compression_ratio
    # the paper's CelebA setting in our nets: 64 px, teacher d=128, student d=8 -> 86.7:1 (paper: 87:1)
    big = compression_ratio(DCGANGenerator(64, 3, 100, 128), DCGANGenerator(64, 3, 100, 8))
    assert big == pytest.approx(87, rel=0.01)


def test_mse_and_joint_objectives_match_formulas():
    torch.manual_seed(0)
    z, real = torch.randn(5, LATENT), torch.rand(5, 1, 8, 8)
    critic = LinearCritic()
    mse_model = DistilledGAN(teacher_net(), student_net(), mode="mse")
    joint = DistilledGAN(teacher_net(), student_net(), critic, alpha=0.3, mode="joint", loss="wgan-gp")
    for model in (mse_model, joint):
        model.train()
        s, t = model.generator(z), model.teacher(z)
        mse = ((s - t) ** 2).mean()
        loss, logs = model.generator_step_loss(z, real)
        if model is mse_model:
            assert torch.allclose(loss, mse, atol=1e-7)
        else:  # α·MSE + (1 - α)·(-E[D(S(z))]) for the Wasserstein generator loss
            assert torch.allclose(loss, 0.3 * mse + 0.7 * (-critic(s).mean()), atol=1e-6)
            assert torch.allclose(logs["adv"], -critic(s).mean().detach(), atol=1e-6)
        assert torch.allclose(logs["distill_mse"], mse.detach(), atol=1e-7)
    assert torch.allclose(distillation_loss(torch.ones(2, 3), torch.zeros(2, 3)), torch.tensor(1.0))
    # the teacher is always in eval mode and gets no gradient
    loss, _ = joint.generator_step_loss(z, real)
    loss.backward()
    assert not joint.teacher.training and all(p.grad is None for p in joint.teacher.parameters())
    assert all(not p.requires_grad for p in joint.teacher.parameters())
    assert not any(p is q for p in joint.generator_parameters() for q in joint.teacher.parameters())


def test_distillation_loss_decreases_and_teacher_stays_fixed(tmp_path):
    teacher = teacher_net()
    before_teacher = flat_params(teacher).clone()
    model = DistilledGAN(teacher, student_net(), mode="mse",
                         generator_optimizer=functools.partial(torch.optim.Adam, lr=1e-2))
    z = torch.randn(256, LATENT, generator=torch.Generator().manual_seed(5))

    def gap() -> float:
        with torch.no_grad():
            return float(distillation_loss(model.sample(z=z, use_ema=False), model.teacher(z)))

    start = gap()
    assert start > 1e-3
    trainer = single_trainer(tmp_path, max_epochs=3)
    dm = digits()
    trainer.fit(model, datamodule=dm)
    assert gap() < 0.5 * start
    assert torch.equal(flat_params(model.teacher), before_teacher)  # weights and BN statistics untouched
    # MSE mode: no critic, one student step per batch
    assert int(model.gan_step) == trainer.global_step == 3 * len(dm.train_dataloader())
    assert trainer.callback_metrics["compression_ratio"].item() == pytest.approx(model.compression_ratio, rel=1e-6)


def test_teacher_from_weights_only_checkpoint(tmp_path):
    gan = GAN(teacher_net(3), DCGANDiscriminator(8, 1, 2), ema_decay=0.5)
    with torch.no_grad():
        for p in gan.generator_ema.parameters():
            p.add_(1.0)  # make the EMA copy distinguishable from the generator
    trainer = single_trainer(tmp_path, max_steps=0)
    trainer.strategy.connect(gan)
    trainer.save_checkpoint(tmp_path / "gan.ckpt")
    loaded = DistilledGAN(teacher_net(0), student_net(), teacher_checkpoint=str(tmp_path / "gan.ckpt"))
    assert torch.equal(flat_params(loaded.teacher), flat_params(gan.generator))
    ema = DistilledGAN(teacher_net(0), student_net(), teacher_checkpoint=str(tmp_path / "gan.ckpt"),
                       teacher_prefix="generator_ema.")
    assert torch.equal(flat_params(ema.teacher), flat_params(gan.generator_ema))
    torch.save(teacher_net(3).state_dict(), tmp_path / "plain.pt")
    plain = DistilledGAN(teacher_net(0), student_net(), teacher_checkpoint=str(tmp_path / "plain.pt"))
    assert torch.equal(flat_params(plain.teacher), flat_params(teacher_net(3)))
    torch.save({"teacher": teacher_net(3)}, tmp_path / "pickled.pt")  # a pickled module, not weights-only
    with pytest.raises(CheckpointError, match="not a weights-only file"):
        DistilledGAN(teacher_net(0), student_net(), teacher_checkpoint=str(tmp_path / "pickled.pt"))
    with pytest.raises(CheckpointError, match=r"teacher_prefix 'nope\.'"):
        DistilledGAN(teacher_net(0), student_net(), teacher_checkpoint=str(tmp_path / "gan.ckpt"),
                     teacher_prefix="nope.")


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        DistilledGAN(teacher_net(), student_net(), mode="kl")
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        DistilledGAN(teacher_net(), student_net(), alpha=1.5)
    with pytest.raises(ValueError, match="mode='mse' trains no discriminator"):
        DistilledGAN(teacher_net(), student_net(), LinearCritic(), mode="mse")
    with pytest.raises(ValueError, match="mode='joint' needs a discriminator"):
        DistilledGAN(teacher_net(), student_net(), mode="joint")
    with pytest.raises(ValueError, match="teacher latent_dim=8, student latent_dim=5"):
        DistilledGAN(teacher_net(), DCGANGenerator(8, 1, 5, 1))
    with pytest.raises(ValueError, match="outputs differ in shape"):
        DistilledGAN(teacher_net(), DCGANGenerator(16, 1, LATENT, 1))
    with pytest.raises(ValueError, match=r"discriminator must be an nn\.Module"):
        GAN(teacher_net(), None)


def test_joint_resume_gives_identical_weights(tmp_path):
    def make() -> DistilledGAN:
        torch.manual_seed(0)
        return DistilledGAN(teacher_net(), student_net(), DCGANDiscriminator(8, 1, 2), alpha=0.5, mode="joint",
                            n_critic=2, ema_decay=0.9)

    straight = make()
    single_trainer(tmp_path / "a", max_epochs=2).fit(straight, datamodule=digits(0.8))
    first = make()
    trainer = single_trainer(tmp_path / "b", max_epochs=1)
    trainer.fit(first, datamodule=digits(0.8))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = make()
    pl.seed_everything(99)  # the global RNG must not matter
    dm = digits(0.8)
    single_trainer(tmp_path / "c", max_epochs=2).fit(resumed, datamodule=dm, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert torch.equal(flat_params(resumed), flat_params(straight))
    assert int(resumed.gan_step) == 2 * len(dm.train_dataloader())


class SaveMetrics(pl.Callback):
    """Rank 0 writes the logged scalars at the end of fit (ddp_spawn returns nothing else to the test)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank == 0:
            torch.save({k: float(v) for k, v in trainer.callback_metrics.items()}, self.path)


@pytest.mark.ddp
def test_ddp_ranks_agree_and_fid_equals_one_process(tmp_path, trained_digits_cnn):
    def evaluation() -> GANEvaluation:
        return GANEvaluation(trained_digits_cnn, feature_name="smallcnn_digits", real_split="test", max_real=201,
                             num_fake=151, kid_subset_size=50, is_splits=1)

    torch.manual_seed(0)
    model = DistilledGAN(teacher_net(), student_net(), DCGANDiscriminator(8, 1, 2), mode="joint", n_critic=2,
                         ema_decay=0.9)
    grid = SampleGrid(num_samples=16, nrow=4)
    trainer = ddp_trainer(tmp_path, find_unused_parameters=True, max_epochs=1,
                          callbacks=[evaluation(), grid, RankGather(tmp_path / "p.pt"),
                                     SaveMetrics(str(tmp_path / "m.pt"))])
    dm = digits(0.8)
    trainer.fit(model, datamodule=dm)

    params = torch.load(tmp_path / "p.pt", weights_only=True)
    assert torch.equal(params[0], params[1])  # student, EMA, critic, teacher: identical on both ranks
    assert torch.equal(params[0], flat_params(model))
    logged = torch.load(tmp_path / "m.pt", weights_only=True)
    dm.setup("test")
    # one process, same data and latents, on the weights the 2 ranks ended with (odd counts: uneven shards)
    single = evaluation().evaluate(SimpleNamespace(datamodule=dm, global_rank=0, world_size=1), model)
    assert logged["val/fid_smallcnn_digits"] == pytest.approx(single["fid"], rel=1e-5)
    assert logged["val/is_smallcnn_digits"] == pytest.approx(single["is"], rel=1e-5)
    assert logged["compression_ratio"] == pytest.approx(model.compression_ratio, rel=1e-6)
    # the grid rank 0 wrote shows the final (shared) generator
    png = np.asarray(Image.open(next((tmp_path / "images").glob("samples_step*.png"))).convert("L"))
    assert np.array_equal(png, (grid.grid(model)[0] * 255).round().to(torch.uint8).numpy())
