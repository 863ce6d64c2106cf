"""NW-GAN: reduction to WGAN for K=1, π learning toward the truth, sampling, errors, checkpoints, DDP."""

import functools

import pytest
import pytorch_lightning as pl
import torch

from lightning_robust.datamodules import GaussianMixtureDataModule
from lightning_robust.models import GAN, NWGAN
from lightning_robust.models.nw_gan import allocate_components
from lightning_robust.nets import MLP, LinearGenerator
from tests.helpers.ddp import RankGather, ddp_trainer, flat_params, single_trainer

PI_TRUE = [0.6, 0.3, 0.1, 0.0]  # three modes on a 2x2 grid, the fourth empty


pytestmark = pytest.mark.usefixtures("one_thread")


def _dm(n_train: int = 2048, batch_size: int = 128) -> GaussianMixtureDataModule:
    return GaussianMixtureDataModule(grid_size=2, spacing=3.0, std=0.2, proportions=PI_TRUE, n_train=n_train,
                                     n_test=0, val_fraction=0.0, batch_size=batch_size)


def _placed_gan(**kw) -> NWGAN:
    """Three affine components started next to the three modes, uniform π: isolates the π dynamics."""
    torch.manual_seed(0)
    opt = functools.partial(torch.optim.RMSprop, lr=2e-3)
    args = dict(num_components=3, latent_dim=2, loss="wgan-clip", n_critic=5, proportions_lr=5e-2,
                generator_optimizer=opt, discriminator_optimizer=opt)
    args.update(kw)
    gan = NWGAN(LinearGenerator(hidden=()), MLP(2, 1, hidden=(64, 64)), **args)
    centers = _dm().centers
    with torch.no_grad():
        for k, comp in enumerate(gan.components):
            comp.layers[0].bias.copy_(centers[k] + 0.2)
            comp.layers[0].weight.copy_(torch.eye(2) * 2.0)  # latent_scale 0.1: std 0.2 like the data
    return gan


def test_k1_nwgan_is_wgan():
    torch.manual_seed(0)
    gen, critic = LinearGenerator(), MLP(2, 1, hidden=(16,))
    nw = NWGAN(gen, critic, num_components=1, latent_dim=2, reinitialise_components=False, gp_weight=0.0)
    wgan = GAN(gen, critic, latent_dim=2, gp_weight=0.0)
    real, z = torch.randn(32, 2), torch.randn(32, 2)
    fake_nw, fake_w = nw.generate(z), wgan.generate(z)
    assert fake_nw.shape == (1, 32, 2) and torch.equal(fake_nw[0], fake_w)
    assert torch.allclose(nw.discriminator_loss(real, fake_nw)[0], wgan.discriminator_loss(real, fake_w)[0])
    assert torch.allclose(nw.generator_loss(fake_nw, real)[0], wgan.generator_loss(fake_w, real)[0])


def test_components_are_independent_copies():
    gan = NWGAN(LinearGenerator(), MLP(2, 1, hidden=(8,)), num_components=3, latent_dim=2)
    p = [flat_params(c) for c in gan.components]
    assert not torch.equal(p[0], p[1]) and not torch.equal(p[1], p[2])
    again = NWGAN(LinearGenerator(), MLP(2, 1, hidden=(8,)), num_components=3, latent_dim=2)
    assert all(torch.equal(a, flat_params(b)) for a, b in zip(p, again.components))  # seeded: reproducible


@pytest.mark.slow
def test_learned_pi_moves_toward_true_proportions(tmp_path):
    gan = _placed_gan()
    start = (gan.proportions - torch.tensor(PI_TRUE[:3])).abs().sum()
    single_trainer(tmp_path, max_epochs=12).fit(gan, datamodule=_dm())
    pi = gan.proportions
    assert (pi >= 0).all() and float(pi.sum()) == pytest.approx(1.0, abs=1e-6)
    end = (pi - torch.tensor(PI_TRUE[:3])).abs().sum()
    assert end < 0.5 * start, (pi, start, end)
    assert pi.argmax() == 0 and pi.argmin() == 2
    # Adversarial clustering: points of each mode go to the component sitting on it.
    dm = _dm()
    x, y = dm.sample(300, torch.Generator().manual_seed(1))
    labels = gan.cluster(x, method="nearest", n_samples=1000)
    assert (labels == y).float().mean() > 0.95


def test_fixed_pi_stays_fixed_and_sampling_follows_pi(tmp_path):
    gan = _placed_gan(learn_proportions=False, initial_proportions=[0.5, 0.3, 0.2])
    single_trainer(tmp_path, max_steps=4).fit(gan, datamodule=_dm(n_train=512))
    assert torch.allclose(gan.proportions, torch.tensor([0.5, 0.3, 0.2]), atol=1e-6)
    samples, comp = gan.sample(10, return_components=True)
    assert samples.shape == (10, 2) and torch.bincount(comp, minlength=3).tolist() == [5, 3, 2]
    assert torch.bincount(allocate_components(torch.tensor([0.55, 0.3, 0.15]), 7), minlength=3).tolist() == [4, 2, 1]
    assert gan.component_samples(6).shape == (3, 6, 2)


def test_place_components_and_kmeans_start(tmp_path):
    gan = NWGAN(LinearGenerator(hidden=(8, 8)), MLP(2, 1, hidden=(8,)), num_components=3, latent_dim=2, ema_decay=0.9)
    centers = torch.tensor([[5.0, 1.0], [-2.0, 3.0], [0.5, -4.0]])
    gan.place_components(centers, n_latents=512)
    z = gan.sample_latents(512, torch.Generator().manual_seed(gan.seed))
    means = torch.stack([c(z).mean(0) for c in gan.components])
    assert torch.allclose(means, centers, atol=1e-5)
    assert torch.equal(flat_params(gan.generator_ema), flat_params(gan.generator))
    with pytest.raises(ValueError, match="centers must have num_components = 3 rows, got 2"):
        gan.place_components(centers[:2])
    # k-means start: one component on each populated mode of the data (fit of 0 steps: only the start).
    km = _placed_gan(init_components="kmeans", kmeans_samples=512)
    single_trainer(tmp_path, max_steps=1, limit_train_batches=1).fit(km, datamodule=_dm(n_train=512))
    pos = km.component_samples(500, use_ema=False).mean(1)
    d = torch.cdist(pos, _dm().centers[:3]).min(dim=1)
    assert (d.values < 0.3).all() and sorted(d.indices.tolist()) == [0, 1, 2]


def test_checkpoint_loads_with_weights_only(tmp_path):
    gan = _placed_gan()
    trainer = single_trainer(tmp_path, max_steps=2)
    trainer.fit(gan, datamodule=_dm(n_train=512))
    trainer.save_checkpoint(tmp_path / "nw.ckpt")
    ckpt = torch.load(tmp_path / "nw.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["num_components"] == 3
    assert ckpt["nw_proportions"] == pytest.approx(gan.proportions.tolist())
    fresh = _placed_gan()
    fresh.load_state_dict(ckpt["state_dict"])
    assert torch.equal(fresh.proportions, gan.proportions)


def test_bad_arguments_and_shapes(tmp_path):
    g, d = LinearGenerator(), MLP(2, 1, hidden=(8,))
    with pytest.raises(ValueError, match="num_components must be a positive integer, got 0"):
        NWGAN(g, d, num_components=0, latent_dim=2)
    with pytest.raises(ValueError, match="proportions must be non-negative"):
        NWGAN(g, d, num_components=2, initial_proportions=[1.5, -0.5], latent_dim=2)
    with pytest.raises(ValueError, match="proportions must sum to one"):
        NWGAN(g, d, num_components=2, initial_proportions=[0.5, 0.2], latent_dim=2)
    with pytest.raises(ValueError, match="proportions must have num_components = 3 entries, got 2"):
        NWGAN(g, d, num_components=3, initial_proportions=[0.5, 0.5], latent_dim=2)
    with pytest.raises(ValueError, match="loss must be 'wgan-gp' or 'wgan-clip'"):
        NWGAN(g, d, loss="ns", latent_dim=2)
    wrong = NWGAN(LinearGenerator(out_features=3), MLP(3, 1, hidden=(8,)), num_components=2, latent_dim=2)
    with pytest.raises(ValueError, match=r"generators produce samples of shape \(3,\) but the real data has .*\(2,\)"):
        single_trainer(tmp_path, max_steps=1).fit(wrong, datamodule=_dm(n_train=256))


def _proportions(_trainer, module):
    return module.proportions


@pytest.mark.ddp
def test_ddp_ranks_agree_on_pi_and_weights(tmp_path):
    gan = _placed_gan(loss="wgan-gp", n_critic=2, ema_decay=0.9, lr_decay=True, init_components="kmeans",
                      kmeans_samples=256)
    trainer = ddp_trainer(tmp_path, find_unused_parameters=True, max_epochs=1,
                          callbacks=[RankGather(tmp_path / "p.pt"),
                                     RankGather(tmp_path / "pi.pt", _proportions)])
    trainer.fit(gan, datamodule=_dm(n_train=1024))
    params, pi = torch.load(tmp_path / "p.pt", weights_only=True), torch.load(tmp_path / "pi.pt", weights_only=True)
    assert torch.equal(params[0], params[1]) and torch.equal(pi[0], pi[1])
    assert torch.equal(params[0], flat_params(gan)) and not torch.allclose(pi[0], torch.full((3,), 1 / 3).double())


def test_resume_with_lr_decay_is_exact(tmp_path):
    """Resuming mid-run replays the straight run bit for bit: π, components, critic and the decayed rates."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    def make() -> NWGAN:
        return _placed_gan(loss="wgan-gp", n_critic=2, ema_decay=0.9, lr_decay=True)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    straight = make()
    single_trainer(tmp_path / "a", max_epochs=2, enable_checkpointing=True, callbacks=[ckpt]).fit(
        straight, datamodule=_dm(n_train=256, batch_size=64))
    resumed = make()
    pl.seed_everything(123)  # the global RNG must not matter: all noise is keyed by the step counter
    single_trainer(tmp_path / "b", max_epochs=2).fit(resumed, datamodule=_dm(n_train=256, batch_size=64),
                                                     ckpt_path=str(tmp_path / "ck" / "epoch=0.ckpt"))
    assert int(resumed.gan_step) == int(straight.gan_step) == 8
    assert torch.equal(flat_params(resumed), flat_params(straight))
    assert torch.equal(resumed.proportions, straight.proportions)
