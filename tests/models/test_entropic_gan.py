"""EntropicGAN: the dual objective against Sinkhorn, the update rules, checkpoints, and a 2-process DDP run."""

import copy
import functools
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from lightning_robust.callbacks import LikelihoodHistogram
from lightning_robust.datamodules import GaussianMixtureDataModule
from lightning_robust.models import EntropicGAN
from lightning_robust.nets import MLP, DualCritic, MLPGenerator
from lightning_robust.ot import (
    entropic_coupling,
    entropic_dual_objective,
    pairwise_cost,
    primal_transport_cost,
    scheduled_reg,
    sinkhorn,
)
from tests.helpers.ddp import RankGather, ddp_trainer, flat_params, single_trainer

f64 = torch.float64


def make_gan(**kw) -> EntropicGAN:
    torch.manual_seed(0)
    G = MLPGenerator(latent_dim=2, out_shape=(2,), hidden=(16, 16))
    D = DualCritic(MLP(2, 1, (16, 16)), MLP(2, 1, (16, 16)))
    opt = functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.99))
    args = dict(cost="l2", reg=0.5, n_critic=2, likelihood_latents=256, generator_optimizer=opt,
                discriminator_optimizer=opt)
    args.update(kw)
    return EntropicGAN(G, D, **args)


def test_dual_objective_matches_its_formula_and_the_guard_only_acts_on_overflow():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(5, generator=g, dtype=f64), torch.randn(4, generator=g, dtype=f64)
    C = torch.rand(5, 4, dtype=f64)
    lam = 0.7
    obj, parts = entropic_dual_objective(u, v, C, lam)
    brute = u.mean() - v.mean() - lam * torch.exp((u[:, None] - v[None, :] - C) / lam - 1).mean()
    torch.testing.assert_close(obj, brute)
    torch.testing.assert_close(entropic_coupling(u, v, C, lam).sum(), parts["mass"])
    torch.testing.assert_close(entropic_coupling(u, v, C, lam, normalize=True).sum(), torch.tensor(1.0, dtype=f64))
    # Far off the optimum a float32 exp overflows; the guarded objective stays finite with finite gradients.
    big = torch.tensor([200.0], requires_grad=True)
    obj32, _ = entropic_dual_objective(big, torch.zeros(1), torch.zeros(1, 1), 1.0)
    obj32.backward()
    assert torch.isfinite(obj32) and torch.isfinite(big.grad)
    with pytest.raises(ValueError, match=r"cost must have shape \[n_real, n_fake\] = \[5, 4\]"):
        entropic_dual_objective(u, v, C.T, lam)


def test_dual_at_sinkhorn_potentials_is_the_entropic_ot_cost_and_stationary():
    # With P = a bᵀ exp((f + g - C)/λ) from Sinkhorn, D1 = f + λ and D2 = -g are the optimal critics:
    # the dual objective equals OT_λ, its coupling equals P, and its gradient in (D1, D2) vanishes.
    g = torch.Generator().manual_seed(1)
    y, y_hat = torch.randn(12, 2, generator=g, dtype=f64), torch.randn(9, 2, generator=g, dtype=f64) + 1
    C, lam = pairwise_cost(y, y_hat), 0.4
    res = sinkhorn(C, reg=lam, tol=1e-13)
    d1 = (res.f + lam).clone().requires_grad_(True)
    d2 = (-res.g).clone().requires_grad_(True)
    obj, parts = entropic_dual_objective(d1, d2, C, lam)
    torch.testing.assert_close(obj, res.objective, atol=1e-10, rtol=0)
    torch.testing.assert_close(entropic_coupling(d1, d2, C, lam), res.plan, atol=1e-12, rtol=0)
    assert abs(float(parts["mass"]) - 1) < 1e-10
    obj.backward()
    assert float(d1.grad.abs().max()) < 1e-10 and float(d2.grad.abs().max()) < 1e-10


def test_primal_loss_moves_each_fake_towards_its_coupled_reals():
    g = torch.Generator().manual_seed(2)
    y, y_hat = torch.randn(6, 2, generator=g, dtype=f64), torch.randn(5, 2, generator=g, dtype=f64).requires_grad_()
    P = torch.rand(6, 5, generator=g, dtype=f64)
    primal_transport_cost(P, pairwise_cost(y, y_hat)).backward()
    expected = (P[:, :, None] * 2 * (y_hat.detach()[None] - y[:, None])).sum(0)  # Σ_j P_ji ∇ |y_j - ŷ_i|²
    torch.testing.assert_close(y_hat.grad, expected)


def test_regularization_schedule_is_the_authors_warm_up():
    got = [scheduled_reg(5.0, s) for s in (0, 48, 49, 98, 99, 198, 199, 10_000)]
    assert got == pytest.approx([10.0, 10.0, 8.0, 8.0, 6.4, 6.4, 5.0, 5.0])
    assert scheduled_reg(5.0, 0, (), ()) == 5.0
    with pytest.raises(ValueError, match="reg_milestones must be strictly increasing"):
        scheduled_reg(1.0, 0, (10, 5), (2.0, 1.5))
    with pytest.raises(ValueError, match="same length"):
        scheduled_reg(1.0, 0, (10,), ())
    gan = make_gan(reg=2.0, n_critic=5, reg_milestones=(3,), reg_factors=(4.0,))
    assert gan.current_reg() == 8.0
    gan.gan_step += 15  # generator iteration 3
    assert gan.current_reg() == 2.0


class _Const(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([value]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0])


def _fit(gan, tmp_path, epochs=1, **kw):
    dm = GaussianMixtureDataModule(n_train=256, n_test=0, val_fraction=0.0, batch_size=64)
    single_trainer(tmp_path, max_epochs=epochs, limit_val_batches=0, **kw).fit(gan, datamodule=dm)


@pytest.mark.parametrize("skip", [True, False])
def test_generator_waits_for_a_fit_critic(tmp_path, skip):
    # A frozen critic with mean D1 < mean D2 is "unfit": the authors skip the generator step then.
    frozen = functools.partial(torch.optim.SGD, lr=0.0)
    torch.manual_seed(0)
    G = MLPGenerator(latent_dim=2, out_shape=(2,), hidden=(8,))
    gan = EntropicGAN(G, DualCritic(_Const(-1.0), _Const(1.0)), cost="l2", reg=1.0, n_critic=1,
                      skip_unfit_critic=skip, discriminator_optimizer=frozen)
    before = flat_params(G)
    _fit(gan, tmp_path)
    assert torch.equal(flat_params(G), before) == skip


def test_hyperparameters_are_primitives_and_checkpoints_load_safely(tmp_path):
    gan = make_gan(reg=0.3, generator_objective="dual", reg_milestones=(2,), reg_factors=(1.5,))
    hp = dict(gan.hparams)
    assert {"loss", "gp_weight", "clip_value", "critics", "generator"}.isdisjoint(hp)
    assert hp["reg"] == 0.3 and hp["generator_objective"] == "dual" and hp["cost"] == "l2"
    trainer = single_trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(gan, datamodule=GaussianMixtureDataModule(n_train=256, n_test=0, val_fraction=0.0, batch_size=64))
    trainer.save_checkpoint(tmp_path / "e.ckpt")
    ckpt = torch.load(tmp_path / "e.ckpt", weights_only=True)
    other = make_gan()
    loaded = EntropicGAN.load_from_checkpoint(tmp_path / "e.ckpt", generator=other.generator, critics=other.critics)
    assert loaded.reg == 0.3 and loaded.generator_objective == "dual" and int(loaded.gan_step) == int(gan.gan_step) > 0
    assert torch.equal(flat_params(loaded), flat_params(gan)) and "state_dict" in ckpt


def test_bad_arguments():
    with pytest.raises(ValueError, match="cost must be one of"):
        make_gan(cost="cosine")
    with pytest.raises(ValueError, match="reg must be a positive number, got 0"):
        make_gan(reg=0)
    with pytest.raises(ValueError, match="generator_objective must be one of"):
        make_gan(generator_objective="wgan")
    with pytest.raises(TypeError, match="critics must provide real_potential"):
        EntropicGAN(MLPGenerator(), MLP(2, 1))


def test_fit_logs_the_dual_parts_and_scores_inputs(tmp_path):
    gan = make_gan()
    dm = GaussianMixtureDataModule(n_train=512, n_test=0, val_fraction=0.25, batch_size=64)
    trainer = single_trainer(tmp_path, max_epochs=2, callbacks=[LikelihoodHistogram(num_samples=64)])
    trainer.fit(gan, datamodule=dm)
    logged = trainer.callback_metrics
    for key in ("train/d_loss", "train/g_loss", "train/transport", "train/coupling_mass", "train/reg",
                "val/log_likelihood", "likelihood/mean_in-distribution", "likelihood/auroc_uniform"):
        assert key in logged and math.isfinite(float(logged[key])), key
    y = torch.randn(7, 2)
    scores = gan.log_likelihood(y)
    assert scores.shape == (7,) and torch.isfinite(scores).all()
    assert torch.allclose(scores, gan.log_likelihood(y))  # deterministic: seeded latents, eval mode
    assert list((tmp_path / "images").glob("likelihood_histogram_step*.png"))


class DualRecorder(pl.Callback):
    """Before each batch, recompute the critics' dual objective on that batch from copies of the nets; after
    it, read what the module logged for the step."""

    def __init__(self) -> None:
        self.expected: list[dict[str, float]] = []
        self.logged: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        real = batch[0]
        critics, generator = copy.deepcopy(pl_module.critics), copy.deepcopy(pl_module.generator)
        # The latents of this step's critic update: standard normal draws from the step-keyed stream "d".
        z = torch.randn(real.shape[0], pl_module.latent_dim, generator=pl_module.step_generator("d"))
        with torch.no_grad():
            fake = generator(z)
            cost = ((real[:, None, :] - fake[None, :, :]) ** 2).sum(-1)  # squared Euclidean, [n_real, n_fake]
            obj, parts = entropic_dual_objective(critics.real_potential(real), critics.fake_potential(fake), cost,
                                                 pl_module.current_reg())
        self.expected.append({"d_loss": -float(obj), "transport": float(parts["transport"]),
                              "coupling_mass": float(parts["mass"]), "reg": pl_module.current_reg()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(float(trainer.callback_metrics["train/d_loss_step"]))


def test_logged_dual_objective_is_entropic_dual_objective_on_the_same_batch(tmp_path):
    gan = make_gan(reg=0.3)
    dm = GaussianMixtureDataModule(n_train=256, n_test=0, val_fraction=0.0, batch_size=64)
    recorder = DualRecorder()
    trainer = single_trainer(tmp_path, max_epochs=1, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(gan, datamodule=dm)
    assert len(recorder.logged) == 4
    for step, (logged, expected) in enumerate(zip(recorder.logged, recorder.expected)):
        assert logged == pytest.approx(expected["d_loss"], rel=1e-5, abs=1e-6), step
    # Epoch aggregates are the means over the (equal-sized) batches.
    metrics = trainer.callback_metrics
    for key in ("transport", "coupling_mass", "reg"):
        mean = sum(e[key] for e in recorder.expected) / 4
        assert float(metrics[f"train/{key}"]) == pytest.approx(mean, rel=1e-5, abs=1e-6), key
    # Not a constant: the critics learn, so the objective moves between steps.
    assert len({round(v, 6) for v in recorder.logged}) == 4


def _final_scores(trainer: pl.Trainer, module: pl.LightningModule) -> torch.Tensor:
    cb = next(c for c in trainer.callbacks if isinstance(c, LikelihoodHistogram))
    return torch.cat([flat_params(module), cb.scores["in-distribution"].sort().values,
                      cb.scores["uniform"].sort().values])


@pytest.mark.ddp
def test_ddp_ranks_agree_and_gathered_scores_match_one_process(tmp_path):
    gan = make_gan()
    dm = GaussianMixtureDataModule(n_train=512, n_test=0, val_fraction=0.25, batch_size=32)
    cb = LikelihoodHistogram(num_samples=1024, ood=("uniform",))
    trainer = ddp_trainer(tmp_path, find_unused_parameters=True, max_epochs=1, num_sanity_val_steps=0,
                          callbacks=[cb, RankGather(tmp_path / "p.pt", fn=_final_scores)])
    trainer.fit(gan, datamodule=dm)
    gathered = torch.load(tmp_path / "p.pt", weights_only=True)
    assert torch.equal(gathered[0], gathered[1])  # identical weights and scores on both ranks
    n_params = flat_params(gan).numel()
    assert torch.equal(gathered[0][:n_params], flat_params(gan))
    # The callback's all-gathered validation scores are the scores of the whole validation set.
    dm.setup("fit")
    val_x = torch.stack([dm.val_dataset[i][0] for i in range(len(dm.val_dataset))])
    expected = gan.log_likelihood(val_x).double().sort().values
    got = gathered[0][n_params:n_params + len(val_x)]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
