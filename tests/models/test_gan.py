"""The GAN base: loss formulas, gradient penalty closed form, update schedule, EMA, resume, DDP."""

import itertools

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from lightning_robust.datamodules import GaussianMixtureDataModule
from lightning_robust.models import GAN
from lightning_robust.models.gan import discriminator_loss, generator_loss, gradient_penalty
from tests.helpers.ddp import RankGather, ddp_trainer, flat_params, single_trainer


class ToyG(nn.Module):
    latent_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def toy_d() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))


def test_losses_match_formulas():
    r = torch.tensor([0.5, -1.0, 2.0])
    f = torch.tensor([0.1, 0.3, -0.7])
    assert torch.allclose(discriminator_loss("wgan-gp", r, f), f.mean() - r.mean())
    sig = torch.sigmoid
    bce = -(torch.log(sig(r)).mean() + torch.log(1 - sig(f)).mean())
    assert torch.allclose(discriminator_loss("ns", r, f), bce, atol=1e-6)
    assert torch.allclose(generator_loss("ns", f), -torch.log(sig(f)).mean(), atol=1e-6)
    assert torch.allclose(discriminator_loss("hinge", r, f), F.relu(1 - r).mean() + F.relu(1 + f).mean())
    assert torch.allclose(generator_loss("wgan-clip", f), -f.mean())
    with pytest.raises(ValueError, match="loss must be one of"):
        generator_loss("lsgan", f)


def test_gradient_penalty_closed_form_for_linear_critic():
    # D(x) = w.x + b has gradient w everywhere, so the penalty is exactly (||w|| - 1)^2.
    critic = nn.Linear(5, 1)
    w = critic.weight.detach().flatten()
    gp = gradient_penalty(critic, torch.randn(8, 5), torch.randn(8, 5))
    assert torch.allclose(gp, (w.norm() - 1) ** 2, atol=1e-6)
    gp.backward()  # differentiable w.r.t. the critic: d/dw (||w||-1)^2 = 2(||w||-1) w/||w||
    assert torch.allclose(critic.weight.grad.flatten(), 2 * (w.norm() - 1) * w / w.norm(), atol=1e-5)


class CountSteps(pl.Callback):
    def __init__(self) -> None:
        self.g_steps = 0
        self.d_steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt_g, opt_d = trainer.optimizers
        self.g_steps = opt_g.state[opt_g.param_groups[0]["params"][0]].get("step", torch.tensor(0)).item()
        self.d_steps = opt_d.state[opt_d.param_groups[0]["params"][0]].get("step", torch.tensor(0)).item()


def _fit(gan, tmp_path, max_steps=None, ckpt=None, **kw):
    dm = GaussianMixtureDataModule(n_train=640, n_test=0, val_fraction=0.0, batch_size=64)
    trainer = single_trainer(tmp_path, max_epochs=2, enable_checkpointing=False, **kw)
    trainer.fit(gan, datamodule=dm, ckpt_path=ckpt)
    return trainer


def test_critic_schedule_and_ema(tmp_path):
    torch.manual_seed(0)
    gan = GAN(ToyG(), toy_d(), loss="wgan-clip", n_critic=5, ema_decay=0.5, clip_value=0.05)
    counter = CountSteps()
    _fit(gan, tmp_path, callbacks=[counter])
    assert counter.d_steps == 20 and counter.g_steps == 4  # 10 batches x 2 epochs, G every 5th batch
    assert all(p.abs().max() <= 0.05 + 1e-7 for p in gan.discriminator.parameters())
    # EMA with decay 0.5 after k updates: a weighted mean of the generator's trajectory, so it differs
    # from the current weights but lies within the range the weights visited.
    assert not torch.equal(flat_params(gan.generator_ema), flat_params(gan.generator))
    assert gan.sample(5).shape == (5, 2)


class GeneratorTrajectory(pl.Callback):
    """Record the generator's weights before training and after every batch (n_critic=1: one G step each)."""

    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self.weights.append(flat_params(pl_module.generator))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(flat_params(pl_module.generator))


def test_ema_is_the_hand_written_recursion(tmp_path):
    # θ_ema(0) = θ(0); θ_ema(k) = d θ_ema(k-1) + (1 - d) θ(k) after each generator step. With d = 0.8 (not
    # 0.5, where d and 1 - d coincide) swapping them gives another trajectory.
    torch.manual_seed(0)
    d = 0.8
    gan = GAN(ToyG(), toy_d(), loss="wgan-gp", n_critic=1, ema_decay=d)
    trajectory = GeneratorTrajectory()
    dm = GaussianMixtureDataModule(n_train=640, n_test=0, val_fraction=0.0, batch_size=64)
    single_trainer(tmp_path, max_epochs=1, limit_train_batches=6, callbacks=[trajectory]).fit(gan, datamodule=dm)
    weights = trajectory.weights
    assert len(weights) == 7 and int(gan.gan_step) == 6
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(weights))  # every batch moved G
    ema = weights[0]
    for theta in weights[1:]:
        ema = d * ema + (1 - d) * theta
    torch.testing.assert_close(flat_params(gan.generator_ema), ema, rtol=0, atol=1e-6)
    swapped = weights[0]
    for theta in weights[1:]:
        swapped = (1 - d) * swapped + d * theta
    assert (flat_params(gan.generator_ema) - swapped).abs().max() > 100 * 1e-6  # far outside the tolerance


def test_resume_gives_identical_weights(tmp_path):
    def make():
        torch.manual_seed(0)
        return GAN(ToyG(), toy_d(), loss="wgan-gp", n_critic=2, ema_decay=0.9)

    straight = make()
    _fit(straight, tmp_path / "a")

    first = make()
    dm = GaussianMixtureDataModule(n_train=640, n_test=0, val_fraction=0.0, batch_size=64)
    trainer = single_trainer(tmp_path / "b", max_epochs=1, enable_checkpointing=False)
    trainer.fit(first, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = make()
    pl.seed_everything(123)  # global RNG state must not matter: the noise is keyed by the step counter
    _fit(resumed, tmp_path / "c", ckpt=str(tmp_path / "mid.ckpt"), )
    assert torch.equal(flat_params(resumed), flat_params(straight))
    assert int(resumed.gan_step) == 20


def test_bad_arguments():
    with pytest.raises(ValueError, match="loss must be one of"):
        GAN(ToyG(), toy_d(), loss="lsgan")
    with pytest.raises(ValueError, match="n_critic must be a positive integer"):
        GAN(ToyG(), toy_d(), n_critic=0)
    with pytest.raises(ValueError, match="latent_dim must be given"):
        GAN(nn.Linear(4, 2), toy_d())
    with pytest.raises(ValueError, match=r"ema_decay must lie in \[0, 1\)"):
        GAN(ToyG(), toy_d(), ema_decay=1.0)


@pytest.mark.ddp
def test_ddp_ranks_agree(tmp_path):
    torch.manual_seed(0)
    gan = GAN(ToyG(), toy_d(), loss="wgan-gp", n_critic=2, ema_decay=0.9)
    dm = GaussianMixtureDataModule(n_train=640, n_test=0, val_fraction=0.0, batch_size=64)
    trainer = ddp_trainer(tmp_path, find_unused_parameters=True, max_epochs=1,
                          callbacks=[RankGather(tmp_path / "p.pt")])
    trainer.fit(gan, datamodule=dm)
    params = torch.load(tmp_path / "p.pt", weights_only=True)
    assert torch.equal(params[0], params[1])
    assert torch.equal(params[0], flat_params(gan))


def test_sampling_restores_each_submodule_mode():
    # A generator training with one submodule deliberately in eval mode (a frozen normalisation layer):
    # sampling runs it in eval mode and must give every submodule its own flag back, not the generator's.
    gan = GAN(ToyG(), toy_d(), loss="wgan-gp", ema_decay=0.0)
    gen = gan.generator.train()
    first = next(m for m in gen.modules() if m is not gen)
    first.eval()
    before = [m.training for m in gen.modules()]
    gan.sample(n=3, use_ema=False)
    assert [m.training for m in gen.modules()] == before
