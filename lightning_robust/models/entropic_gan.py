"""Entropic optimal-transport GAN with per-sample likelihoods (Balaji et al., arXiv 1810.04147)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_lightning.cli import OptimizerCallable
from torch import nn

from lightning_robust.models.gan import GAN
from lightning_robust.ot.costs import COSTS, pairwise_cost
from lightning_robust.ot.entropic_dual import (
    entropic_coupling,
    entropic_dual_objective,
    primal_transport_cost,
    scheduled_reg,
)
from lightning_robust.ot.likelihood import entropic_log_likelihood
from lightning_robust.utils.validation import check_choice, check_positive, check_positive_int

__all__ = ["EntropicGAN", "entropic_gan_optimizer"]


def entropic_gan_optimizer(params: Any) -> torch.optim.Optimizer:
    """Adam(lr 2e-4, betas (0.5, 0.99), eps 1e-8): the authors' setting for both networks."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.99), eps=1e-8)


class EntropicGAN(GAN):
    """The entropic GAN of "Entropic GANs meet VAEs" (Balaji, Hassani, Chellappa, Feizi; arXiv 1810.04147).

    The generator minimizes the entropy-regularized OT cost to the data; the two critics ``D1`` (real side)
    and ``D2`` (generated side) maximize its minibatch dual (:func:`~lightning_robust.ot.entropic_dual_objective`)

        mean D1(y) - mean D2(ŷ) - λ mean exp((D1(y) - D2(ŷ) - ℓ(y, ŷ)) / λ - 1).

    With ``generator_objective="primal"`` (the authors' README setting) the generator minimizes
    ``Σ P*_ji ℓ(y_j, G(z_i))`` with the critics' coupling ``P*`` held fixed (the envelope-theorem gradient of
    the entropic OT cost); with ``"dual"`` it minimizes the dual objective itself. As in the authors'
    trainer, the generator step is skipped while the critic is not yet fit (``mean D1 <= mean D2``), and
    ``λ`` follows a warm-up schedule over generator iterations (:func:`~lightning_robust.ot.scheduled_reg`).

    The trained model has an explicit density: ``X ~ N(0, I)``, ``f(y | x) ∝ exp(-ℓ(y, G(x)) / λ)``;
    :meth:`log_likelihood` returns the paper's per-sample lower bound on ``log f_Y(y)`` (usable as an
    out-of-distribution score), and ``validation_step`` logs its mean as ``val/log_likelihood``.

    Args:
        generator: latents -> samples.
        critics: a :class:`~lightning_robust.nets.DualCritic` (``real_potential`` and ``fake_potential``).
        latent_dim, latent_shape: as :class:`~lightning_robust.models.GAN`.
        cost: ``"l1"`` (sum of absolute differences; the authors' MNIST cost) or ``"l2"`` (squared Euclidean).
        reg: ``λ`` after the warm-up (the authors' ``Lambda`` = 5 with the L1 cost on 784 pixels).
        reg_milestones, reg_factors: ``λ = reg * reg_factors[k]`` before generator iteration
            ``reg_milestones[k]`` (defaults: the authors' 2, 1.6, 1.28 until 49, 99, 199); empty = constant.
        generator_objective: ``"primal"`` or ``"dual"``.
        skip_unfit_critic: skip generator steps while ``mean D1(y) <= mean D2(ŷ)`` on the last critic batch
            (averaged over DDP ranks, so all ranks decide alike).
        n_critic: critic steps per generator step (5).
        generator_optimizer, discriminator_optimizer: ``params -> Optimizer`` (Adam 2e-4, betas (0.5, 0.99)).
        ema_decay, n_fixed_latents, seed: as :class:`~lightning_robust.models.GAN`.
        likelihood_latents: latent samples for :meth:`log_likelihood` and validation.
        likelihood_chunk_size: latents evaluated at a time there.

    Raises:
        ValueError: on an unknown cost or objective, non-positive ``reg`` or a bad schedule.

    Example:
        >>> critics = DualCritic(MLP(2, 1, (128, 128)), MLP(2, 1, (128, 128)))
        >>> gan = EntropicGAN(MLPGenerator(latent_dim=2), critics, cost="l2", reg=0.1)
        >>> pl.Trainer(max_epochs=20).fit(gan, datamodule=GaussianMixtureDataModule())
        >>> gan.log_likelihood(torch.randn(8, 2))  # [8] lower bounds on log p(y)
    """

    def __init__(
        self,
        generator: nn.Module,
        critics: nn.Module,
        latent_dim: int | None = None,
        latent_shape: tuple[int, ...] = (),
        cost: str = "l1",
        reg: float = 5.0,
        reg_milestones: Sequence[int] = (49, 99, 199),
        reg_factors: Sequence[float] = (2.0, 1.6, 1.28),
        generator_objective: str = "primal",
        skip_unfit_critic: bool = True,
        n_critic: int = 5,
        generator_optimizer: OptimizerCallable = entropic_gan_optimizer,
        discriminator_optimizer: OptimizerCallable = entropic_gan_optimizer,
        ema_decay: float | None = None,
        n_fixed_latents: int = 64,
        seed: int = 0,
        likelihood_latents: int = 4096,
        likelihood_chunk_size: int = 1024,
    ) -> None:
        for name in ("real_potential", "fake_potential"):
            if not callable(getattr(critics, name, None)):
                raise TypeError(f"critics must provide {name}() (use lightning_robust.nets.DualCritic), "
                                f"got {type(critics).__name__}")
        with warnings.catch_warnings():
            # The base's save_hyperparameters sees our `critics` argument too; ours below drops it.
            warnings.filterwarnings("ignore", message=".*'critics' is an instance of `nn.Module`.*")
            super().__init__(generator, critics, latent_dim=latent_dim, latent_shape=latent_shape, loss="wgan-gp",
                             n_critic=n_critic, gp_weight=0.0, generator_optimizer=generator_optimizer,
                             discriminator_optimizer=discriminator_optimizer, ema_decay=ema_decay,
                             n_fixed_latents=n_fixed_latents, seed=seed)
        check_choice("cost", cost, COSTS)
        check_positive("reg", reg)
        scheduled_reg(reg, 0, tuple(reg_milestones), tuple(reg_factors))  # validates the schedule
        check_choice("generator_objective", generator_objective, ("primal", "dual"))
        check_positive_int("likelihood_latents", likelihood_latents)
        check_positive_int("likelihood_chunk_size", likelihood_chunk_size)
        # Our own hyper-parameters; drop the base's fixed ones, which are not arguments of this class.
        self.save_hyperparameters(ignore=["generator", "critics", "generator_optimizer", "discriminator_optimizer",
                                          "discriminator", "loss", "gp_weight", "clip_value"])
        self.cost = cost
        self.reg = float(reg)
        self.reg_milestones = tuple(int(m) for m in reg_milestones)
        self.reg_factors = tuple(float(f) for f in reg_factors)
        self.generator_objective = generator_objective
        self.skip_unfit_critic = skip_unfit_critic
        self.likelihood_latents = likelihood_latents
        self.likelihood_chunk_size = likelihood_chunk_size
        self._critic_fit = True

    @property
    def critics(self) -> Any:
        """The :class:`~lightning_robust.nets.DualCritic` (stored as ``discriminator`` by the base); any module
        with ``real_potential`` and ``fake_potential`` methods will do."""
        return self.discriminator

    # ---- the objective --------------------------------------------------------------------------------
    def current_reg(self) -> float:
        """``λ`` at the current generator iteration (``gan_step // n_critic``) under the warm-up schedule."""
        return scheduled_reg(self.reg, int(self.gan_step) // self.n_critic, self.reg_milestones, self.reg_factors)

    def cost_matrix(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """``ℓ(y_j, ŷ_i)``, shape [n_real, n_fake]."""
        return pairwise_cost(real, fake, self.cost)

    def _synced_mean(self, value: torch.Tensor) -> float:
        value = value.detach()
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            value = trainer.strategy.reduce(value, reduce_op="mean")
        return float(value)

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        lam = self.current_reg()
        d_real = self.critics.real_potential(real)
        d_fake = self.critics.fake_potential(fake)
        objective, parts = entropic_dual_objective(d_real, d_fake, self.cost_matrix(real, fake), lam)
        self._critic_fit = self._synced_mean(parts["transport"]) > 0
        logs = {"transport": parts["transport"].detach(), "smoothing": parts["smoothing"].detach(),
                "coupling_mass": parts["mass"].detach(), "reg": lam}
        return -objective, logs

    def generator_loss(self, fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        lam = self.current_reg()
        cost = self.cost_matrix(real, fake)
        if self.generator_objective == "primal":
            with torch.no_grad():
                coupling = entropic_coupling(self.critics.real_potential(real), self.critics.fake_potential(fake),
                                             cost, lam, normalize=True)
            return primal_transport_cost(coupling, cost), {}
        objective, _ = entropic_dual_objective(self.critics.real_potential(real), self.critics.fake_potential(fake),
                                               cost, lam)
        return objective, {}

    def generator_step_due(self) -> bool:
        return super().generator_step_due() and (self._critic_fit or not self.skip_unfit_critic)

    # ---- likelihoods ----------------------------------------------------------------------------------
    def log_likelihood(self, y: torch.Tensor, n_latents: int | None = None, estimator: str = "importance",
                       batch_size: int = 1024) -> torch.Tensor:
        """The per-sample lower bound on ``log f_Y(y)`` (paper's surrogate likelihood), shape [B].

        Scores any inputs shaped like the data, e.g. out-of-distribution ones (a lower score = less
        likely). Uses the current ``λ`` (:meth:`current_reg`), the critics' ``D2`` and the (non-EMA)
        generator they were trained against; see :func:`~lightning_robust.ot.entropic_log_likelihood`.
        """
        res = entropic_log_likelihood(
            self.generator, self.critics, y.to(self.device), n_latents=n_latents or self.likelihood_latents,
            reg=self.current_reg(), cost=self.cost, latent_dim=(self.latent_dim, *self.latent_shape),
            chunk_size=self.likelihood_chunk_size, batch_size=batch_size, estimator=estimator, seed=self.seed)
        return res.log_likelihood.to(y.dtype if y.is_floating_point() else torch.float32)

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        real = self.real_from_batch(batch)
        scores = self.log_likelihood(real)
        self.log("val/log_likelihood", scores.mean(), on_epoch=True, sync_dist=True, prog_bar=True)
        return {"log_likelihood": scores}

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        real = self.real_from_batch(batch)
        scores = self.log_likelihood(real)
        self.log("test/log_likelihood", scores.mean(), on_epoch=True, sync_dist=True)
        return {"log_likelihood": scores}
