"""A general GAN LightningModule with manual optimization, and the standard GAN losses as pure functions.

Losses (D is the critic / discriminator, G the generator, ``r = D(x_real)``, ``f = D(G(z))``):

* ``"wgan-gp"`` (Gulrajani et al. 2017, arXiv 1704.00028): ``L_D = E[f] - E[r] + λ E[(||∇D(x̂)||_2 - 1)^2]``
  with ``x̂ = ε x_real + (1 - ε) x_fake``, ``ε ~ U[0, 1]``; ``L_G = -E[f]``.
* ``"wgan-clip"`` (Arjovsky et al. 2017, arXiv 1701.07875): ``L_D = E[f] - E[r]``, critic weights clipped
  to ``[-c, c]`` after each step; ``L_G = -E[f]``.
* ``"ns"`` (Goodfellow et al. 2014, non-saturating): ``L_D = E[softplus(-r)] + E[softplus(f)]``,
  ``L_G = E[softplus(-f)]``.
* ``"hinge"`` (Miyato et al. 2018): ``L_D = E[relu(1 - r)] + E[relu(1 + f)]``, ``L_G = -E[f]``.

Subclasses (NW-GAN, entropic GAN, distilled GAN) override :meth:`GAN.generate`,
:meth:`GAN.discriminator_loss`, :meth:`GAN.generator_loss` (or the whole generator step,
:meth:`GAN.generator_step_loss`, which also sees the latents) and the parameter groups.
"""

from __future__ import annotations

import copy
import inspect
import types
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from pytorch_lightning.utilities.parsing import collect_init_args
from torch import nn

from lightning_robust.utils.batch import split_batch
from lightning_robust.utils.checkpoint import WeightsOnlyLoadFromCheckpoint
from lightning_robust.utils.epoch_means import EpochMeans
from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.rng import keyed_generator
from lightning_robust.utils.validation import (
    check_choice,
    check_fraction,
    check_non_negative,
    check_positive,
    check_positive_int,
    check_seed,
)

__all__ = ["GAN", "GAN_LOSSES", "default_gan_optimizer", "discriminator_loss", "generator_loss", "gradient_penalty"]

GAN_LOSSES = ("wgan-gp", "wgan-clip", "ns", "hinge")


def default_gan_optimizer(params: Any) -> torch.optim.Optimizer:
    """Adam(lr 1e-4, betas (0.5, 0.9)): the WGAN-GP paper's setting, also stable for the other losses."""
    return torch.optim.Adam(params, lr=1e-4, betas=(0.5, 0.9))


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None, target: float = 1.0) -> torch.Tensor:
    """``E[(||∇_x̂ D(x̂)||_2 - target)^2]`` at random interpolates ``x̂`` of real and fake samples (WGAN-GP).

    ``create_graph=True`` so the penalty itself is differentiated w.r.t. the critic's weights.
    """
    eps = torch.rand(real.shape[0], *([1] * (real.ndim - 1)), generator=generator, device=real.device,
                     dtype=real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    out = critic(x_hat)
    (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    return ((grad.flatten(1).norm(p=2, dim=1) - target) ** 2).mean()


def discriminator_loss(loss: str, d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator / critic loss (without the gradient penalty) for ``loss`` in :data:`GAN_LOSSES`."""
    d_real, d_fake = d_real.flatten(), d_fake.flatten()
    if loss in ("wgan-gp", "wgan-clip"):
        return d_fake.mean() - d_real.mean()
    if loss == "ns":
        return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    if loss == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    raise ValueError(f"loss must be one of {list(GAN_LOSSES)}, got {loss!r}")


def generator_loss(loss: str, d_fake: torch.Tensor) -> torch.Tensor:
    """The generator loss for ``loss`` in :data:`GAN_LOSSES` (non-saturating form for ``"ns"``)."""
    d_fake = d_fake.flatten()
    if loss == "ns":
        return F.softplus(-d_fake).mean()
    if loss in GAN_LOSSES:
        return -d_fake.mean()
    raise ValueError(f"loss must be one of {list(GAN_LOSSES)}, got {loss!r}")


def _is_primitive(value: Any) -> bool:
    """True for values that belong in ``hparams``: numbers, strings, None and containers of those."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_primitive(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_primitive(v) for k, v in value.items())
    return False


class GAN(WeightsOnlyLoadFromCheckpoint, pl.LightningModule):  # type: ignore[misc]  # weights-only override
    """Generator + discriminator trained by alternating updates (manual optimization).

    Every training batch updates the discriminator once; every ``n_critic``-th batch also updates the
    generator (so ``n_critic=5`` is WGAN's five critic steps per generator step, each on a fresh real
    batch). Latent noise and gradient-penalty interpolation weights come from a generator seeded by
    ``(seed, step counter, rank)``, so a resumed run draws exactly the noise an uninterrupted run would,
    without storing RNG state; each DDP rank draws different noise.

    Logs ``train/d_loss``, ``train/g_loss`` (and ``train/gp`` for WGAN-GP). Note that Lightning's
    ``global_step`` counts optimizer steps of both optimizers in manual optimization.

    Sample quality (FID / KID / IS) is measured by the
    :class:`~lightning_robust.callbacks.GANEvaluation` callback, sample grids logged by
    :class:`~lightning_robust.callbacks.SampleGrid`; neither needs a ``validation_step``.

    Under DDP the discriminator step's backward leaves the generator's parameters without gradients,
    so use ``strategy="ddp_find_unused_parameters_true"`` (or ``DDPStrategy(find_unused_parameters=True)``).

    Args:
        generator: maps latents ``[B, latent_dim]`` (or the shape in ``latent_shape``) to samples.
        discriminator: maps samples to one score per sample. ``None`` is accepted only by subclasses
            whose :meth:`generator_step_loss` needs no critic (e.g. MSE distillation); then every batch is
            one generator step.
        latent_dim: size of the latent vector; read from ``generator.latent_dim`` when omitted.
        latent_shape: optional extra trailing latent shape (e.g. ``(1, 1)`` for DCGAN's ``[B, nz, 1, 1]``).
        loss: one of ``"wgan-gp"``, ``"wgan-clip"``, ``"ns"``, ``"hinge"``.
        n_critic: discriminator steps per generator step.
        gp_weight: λ of the gradient penalty (WGAN-GP).
        clip_value: c of weight clipping (WGAN).
        generator_optimizer, discriminator_optimizer: ``params -> Optimizer``.
        ema_decay: if set (e.g. 0.999), keep an exponential moving average of the generator's weights
            (``generator_ema``), used by :meth:`sample`.
        n_fixed_latents: size of the fixed latent batch (a buffer) used for sample grids.
        seed: base seed of the per-step noise. With a logger, Lightning merges the module's and the
            DataModule's hparams and refuses a `seed` key with two values: give both the same seed.

    Raises:
        ValueError: on an unknown loss or invalid numbers.

    Example:
        >>> gan = GAN(generator, discriminator, latent_dim=64, loss="wgan-gp", n_critic=5)
        >>> pl.Trainer(max_epochs=10).fit(gan, datamodule=dm)
        >>> images = gan.sample(16)
    """

    fixed_latents: torch.Tensor
    gan_step: torch.Tensor

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module | None,
        latent_dim: int | None = None,
        latent_shape: tuple[int, ...] = (),
        loss: str = "wgan-gp",
        n_critic: int = 5,
        gp_weight: float = 10.0,
        clip_value: float = 0.01,
        generator_optimizer: OptimizerCallable = default_gan_optimizer,
        discriminator_optimizer: OptimizerCallable = default_gan_optimizer,
        ema_decay: float | None = None,
        n_fixed_latents: int = 64,
        seed: int = 0,
    ) -> None:
        check_seed("seed", seed)
        super().__init__()
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator must be an nn.Module, got {type(generator).__name__}")
        if discriminator is None:
            if type(self).generator_step_loss is GAN.generator_step_loss:
                raise ValueError("discriminator must be an nn.Module: the adversarial generator loss needs a critic")
        elif not isinstance(discriminator, nn.Module):
            raise TypeError(f"discriminator must be an nn.Module or None, got {type(discriminator).__name__}")
        if latent_dim is None:
            latent_dim = getattr(generator, "latent_dim", None)
            if not isinstance(latent_dim, int):
                raise ValueError("latent_dim must be given (the generator has no integer `latent_dim` attribute)")
        check_positive_int("latent_dim", latent_dim)
        for i, s in enumerate(latent_shape):
            check_positive_int(f"latent_shape[{i}]", s)
        check_choice("loss", loss, GAN_LOSSES)
        check_positive_int("n_critic", n_critic)
        check_non_negative("gp_weight", gp_weight)
        check_positive("clip_value", clip_value)
        if ema_decay is not None:
            check_fraction("ema_decay", ema_decay)
        check_positive_int("n_fixed_latents", n_fixed_latents)
        self._save_primitive_hyperparameters(inspect.currentframe())
        self.automatic_optimization = False
        self.generator = generator
        self.discriminator: nn.Module | None = discriminator
        self.latent_dim = latent_dim
        self.latent_shape = tuple(latent_shape)
        self.loss_name = loss
        self.n_critic = n_critic
        self.gp_weight = gp_weight
        self.clip_value = clip_value
        self.ema_decay = ema_decay
        self.seed = seed
        self.generator_optimizer_factory = generator_optimizer
        self.discriminator_optimizer_factory = discriminator_optimizer
        self.generator_ema: nn.Module | None = None
        if ema_decay is not None:
            self.generator_ema = copy.deepcopy(generator).requires_grad_(False).eval()
        g = torch.Generator().manual_seed(seed + 7919)
        self.register_buffer("fixed_latents", torch.randn(n_fixed_latents, latent_dim, *self.latent_shape,
                                                          generator=g))
        # Counts training batches; part of the checkpoint, it keys the per-step noise.
        self.register_buffer("gan_step", torch.zeros((), dtype=torch.long))
        # The epoch-only logs (gp, the subclasses' dual parts and proportions): summed per step, logged per
        # epoch (a self.log call per value and step cost ~10% of a CPU fit; see EpochMeans).
        self.epoch_means = EpochMeans()

    def _save_primitive_hyperparameters(self, frame: types.FrameType | None) -> None:
        """``save_hyperparameters`` over the constructor chain, skipping modules, tensors and callables.

        Subclasses add their own module arguments (teachers, mixtures of generators, ...); keeping only
        primitives in ``hparams`` keeps checkpoints loadable with ``weights_only=True`` and avoids deep
        copies of large nets, without each subclass having to list its module arguments.
        """
        if frame is None:  # no frame support in this interpreter: fall back to the base's own arguments
            self.save_hyperparameters(ignore=["generator", "discriminator", "generator_optimizer",
                                              "discriminator_optimizer"])
            return
        init_args: dict[str, Any] = {}
        for level in collect_init_args(frame, [], classes=(GAN,)):
            init_args.update(level)
        ignore = sorted(k for k, v in init_args.items() if not _is_primitive(v))
        self.save_hyperparameters(ignore=ignore, frame=frame)

    # ---- noise ----------------------------------------------------------------------------------------
    def step_generator(self, stream: str = "latent") -> torch.Generator:
        """A generator seeded by (seed, step counter, global rank, stream): stateless and resumable."""
        return keyed_generator(f"{self.seed}/{int(self.gan_step)}/{self.global_rank}/{stream}", self.device)

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` standard normal latents of shape ``[n, latent_dim, *latent_shape]``."""
        return torch.randn(n, self.latent_dim, *self.latent_shape, generator=generator, device=self.device)

    # ---- the model ------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Map latents to samples during training (subclasses: mixtures of generators, ...)."""
        return self.generator(z)

    @torch.no_grad()
    def sample(self, n: int | None = None, z: torch.Tensor | None = None, use_ema: bool = True) -> torch.Tensor:
        """Samples from the (EMA) generator in eval mode: ``z`` given, else the first ``n`` fixed latents."""
        if z is None:
            if n is None or n <= len(self.fixed_latents):
                z = self.fixed_latents[: n or len(self.fixed_latents)]
            else:
                z = self.sample_latents(n)
        net = self.generator_ema if (use_ema and self.generator_ema is not None) else self.generator
        with model_mode(net, "eval"):
            return net(z.to(self.device))  # type: ignore[no-any-return]

    def _critic(self) -> nn.Module:
        """The discriminator, or a clear error when this GAN was built without one."""
        if self.discriminator is None:
            raise RuntimeError(f"{type(self).__name__} was built without a discriminator")
        return self.discriminator

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return ``(loss, logs)`` of one discriminator step; ``fake`` is detached."""
        critic = self._critic()
        loss = discriminator_loss(self.loss_name, critic(real), critic(fake))
        logs: dict[str, Any] = {}
        if self.loss_name == "wgan-gp" and self.gp_weight > 0:
            gp = gradient_penalty(critic, real, fake, self.step_generator("gp"))
            logs["gp"] = gp.detach()
            loss = loss + self.gp_weight * gp
        return loss, logs

    def generator_loss(self, fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """Return ``(loss, logs)`` of one generator step (``fake`` carries the graph to the generator)."""
        return generator_loss(self.loss_name, self._critic()(fake)), {}

    def generator_step_loss(self, z: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss of one generator step from its latents ``z``: ``generator_loss(generate(z), real)``.

        Override this instead of :meth:`generator_loss` when the loss needs the latents themselves (a
        distilled student compares ``S(z)`` with its teacher's ``T(z)``).
        """
        return self.generator_loss(self.generate(z), real)

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.generator.parameters())

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [] if self.discriminator is None else list(self.discriminator.parameters())

    # ---- evaluation -----------------------------------------------------------------------------------
    def test_step(self, batch: Any, batch_idx: int) -> Any:
        """Nothing per batch: a GAN is measured by its evaluation callbacks.

        ``GANEvaluation`` (FID / KID / Inception score against a real split) and ``SampleGrid`` evaluate at
        the end of ``trainer.test``; Lightning runs that loop only for a module that defines the step, so the
        step exists and returns nothing. There is deliberately no ``validation_step``: it would make ``fit``
        run a validation loop (and require a validation split) for nothing, since during ``fit`` the
        callbacks evaluate at the end of training epochs.
        """
        return None

    # ---- training -------------------------------------------------------------------------------------
    def generator_step_due(self) -> bool:
        """Whether this batch also updates the generator (every ``n_critic``-th batch; subclasses may veto,
        e.g. while the critic is not yet fit). Must return the same on every DDP rank."""
        return int(self.gan_step) % self.n_critic == 0

    @staticmethod
    def real_from_batch(batch: Any) -> torch.Tensor:
        """The real samples of a batch: a tensor, or the ``x`` of ``(x, y[, index])`` / dict batches."""
        return batch if torch.is_tensor(batch) else split_batch(batch).x

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opts = self.optimizers()
        real = self.real_from_batch(batch)
        n = real.shape[0]
        if self.discriminator is None:  # generator-only objective: every batch is a generator step
            self._generator_step(opts, n, real)  # type: ignore[arg-type]
            self.gan_step += 1
            self._broadcast_buffers()
            return
        opt_g, opt_d = opts  # type: ignore[misc, attr-defined]

        z = self.sample_latents(n, self.step_generator("d"))
        with torch.no_grad():
            fake = self.generate(z)
        d_loss, d_logs = self.discriminator_loss(real, fake.detach())
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(d_loss)
        opt_d.step()
        if self.loss_name == "wgan-clip":
            with torch.no_grad():
                for p in self.discriminator_parameters():
                    p.clamp_(-self.clip_value, self.clip_value)
        self.log("train/d_loss", d_loss.detach(), prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.epoch_means.add(d_logs, n)

        if self.generator_step_due():
            self._generator_step(opt_g, n, real)
        self.gan_step += 1
        self._broadcast_buffers()

    def _broadcast_buffers(self) -> None:
        """Under DDP, copy rank 0's buffers (BatchNorm statistics, EMA copies) to every rank.

        Each rank updates its BatchNorm running statistics on its own batch; DDP re-broadcasts rank 0's
        buffers only at the start of the next forward, so after the last step of an epoch the ranks would
        disagree (and so would their samples, e.g. the shards of an FID evaluation). Broadcasting at the
        end of every step makes the ranks identical whenever a callback looks.
        """
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() < 2:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buf in self.buffers():
            by_dtype.setdefault(buf.dtype, []).append(buf)
        for bufs in by_dtype.values():  # one collective per dtype, not one per tensor
            flat = torch.cat([b.detach().reshape(-1) for b in bufs])
            torch.distributed.broadcast(flat, src=0)
            offset = 0
            with torch.no_grad():
                for b in bufs:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()

    def _generator_step(self, opt_g: Any, n: int, real: torch.Tensor) -> None:
        z = self.sample_latents(n, self.step_generator("g"))
        g_loss, g_logs = self.generator_step_loss(z, real)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(g_loss)
        opt_g.step()
        self.update_ema()
        self.log("train/g_loss", g_loss.detach(), prog_bar=True, on_step=True, on_epoch=True, sync_dist=True)
        self.epoch_means.add(g_logs, n)

    def on_train_epoch_end(self) -> None:
        """Log the epoch means of the per-step values (``train/gp``, the subclasses' extra logs)."""
        self.epoch_means.log(self, prefix="train/")

    @torch.no_grad()
    def update_ema(self) -> None:
        """``θ_ema <- d θ_ema + (1 - d) θ`` (buffers such as BN statistics are copied)."""
        if self.generator_ema is None or self.ema_decay is None:
            return
        for p_ema, p in zip(self.generator_ema.parameters(), self.generator.parameters()):
            p_ema.lerp_(p.detach(), 1.0 - self.ema_decay)
        for b_ema, b in zip(self.generator_ema.buffers(), self.generator.buffers()):
            b_ema.copy_(b)

    def configure_optimizers(self) -> Any:
        opt_g = self.generator_optimizer_factory(self.generator_parameters())
        if self.discriminator is None:
            return opt_g
        opt_d = self.discriminator_optimizer_factory(self.discriminator_parameters())
        return [opt_g, opt_d]
