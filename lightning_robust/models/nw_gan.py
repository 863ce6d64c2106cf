"""NW-GAN: a mixture of K generators with learnable proportions, trained with the Normalized Wasserstein dual.

Balaji, Chellappa & Feizi, "Normalized Wasserstein for Mixture Distributions with Applications in
Adversarial Learning and Domain Adaptation" (ICCV 2019, arXiv 1902.00415), section "NW-GAN"::

    min_{G_1..G_K, π}  max_{D 1-Lip}   E_{x~P_X}[D(x)] - Σ_k π_k E_z[D(G_k(z))],     π = softmax(θ)

Each generator models one mixture component and ``π`` their proportions; the critic sees the π-weighted
mixture. With ``learn_proportions=False`` ``π`` stays at its initial value (the paper's fixed-π baseline).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from pytorch_lightning.cli import OptimizerCallable
from torch import nn

from lightning_robust.models.gan import GAN, default_gan_optimizer, gradient_penalty
from lightning_robust.ot.mixtures import assign_to_generators, kmeans
from lightning_robust.ot.normalized_wasserstein import (
    MixtureProportions,
    mixture_expectation,
    normalized_wasserstein,
    sample_mixture,
)
from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.validation import check_choice, check_positive, check_positive_int, check_seed

__all__ = ["NWGAN", "allocate_components"]


def allocate_components(proportions: torch.Tensor, n: int) -> torch.Tensor:
    """Component index of each of ``n`` samples, ``≈ π_k n`` of component ``k``, in blocks.

    ``floor(π_k n)`` samples per component (as the authors' evaluation takes ``floor(π_k B)`` samples of
    each generator), the remaining ones to the largest remainders, so that exactly ``n`` are returned.
    """
    pi = proportions.detach().double().cpu()
    raw = pi * n
    counts = raw.floor().long()
    rest = n - int(counts.sum())
    if rest > 0:
        counts[torch.argsort(raw - counts, descending=True)[:rest]] += 1
    return torch.repeat_interleave(torch.arange(pi.numel()), counts)


def _reinitialise(module: nn.Module, seed: int) -> None:
    """Re-draw every ``reset_parameters`` layer of ``module`` from a seed (independent components)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()


class NWGAN(GAN):
    """Normalized-Wasserstein GAN: ``K`` generators, learnable mixture proportions ``π``, one critic.

    The ``generator`` argument is a template: it is copied into ``K`` components (``self.components``),
    each re-initialised from its own seed (``reinitialise_components``), so that they can specialise on
    different modes. Every training step feeds the same latents to all components; the critic scores
    ``K x B`` generated samples and the real batch, and the NW dual
    (:func:`~lightning_robust.ot.normalized_wasserstein`) weights component ``k`` by ``π_k``. The critic
    step uses ``π`` detached; the generator step updates the
    components and the logits of ``π`` together (one optimiser, ``π`` in its own parameter group with
    ``proportions_lr``), as the authors' code does. For WGAN-GP the penalty is taken at interpolates between
    the real batch and a sample of the π-mixture (:func:`~lightning_robust.ot.sample_mixture`).

    Logs ``train/d_loss``, ``train/g_loss``, ``train/nw`` (the critic's NW estimate), ``train/gp`` and
    ``train/pi_k`` for each component. Under DDP use ``strategy="ddp_find_unused_parameters_true"``; ``π``
    is a parameter, so DDP keeps it identical on every rank.

    Args:
        generator: template component generator, latents ``[B, latent_dim, *latent_shape]`` to samples.
        discriminator: the critic, samples to one score each.
        num_components: ``K >= 1`` generators.
        learn_proportions: learn ``π`` (NW-GAN) or keep it fixed (fixed-π mixture baseline).
        initial_proportions: initial (or fixed) ``π``; uniform if ``None``. (Not ``proportions``: that is the
            data module's argument, and Lightning refuses equal hparam names with different values.)
        proportions_lr: learning rate of ``π``'s parameter group (the authors use 200x the generator's with
            RMSprop on 2-D data, 20x with Adam on images); ``None`` uses the generator's.
        reinitialise_components: re-draw each copy's parameters (``reset_parameters``) from
            ``seed + 1000 k``; with ``False`` all components start equal (they then stay nearly equal).
        init_components: ``"random"`` (each component as initialised) or ``"kmeans"``: at the start of
            training, shift each component so that its mean output sits on one of ``K`` k-means centres of
            the first ``kmeans_samples`` training samples (:meth:`place_components`; rank 0's centres are
            broadcast under DDP; skipped when resuming). From random starts the components tend to pile onto
            the heaviest modes and ``π`` follows them (see BENCHMARKS.md); k-means starts spread them.
        kmeans_samples: number of training samples for ``"kmeans"``.
        lr_decay: decay every learning rate linearly to zero over the training batches (the ``DECAY``
            option of the authors' image NW-GAN). WGAN-GP critics keep a unit gradient norm up to the
            optimum, so with a constant rate the components orbit their modes; the decay damps that.
        latent_dim, latent_shape, loss, n_critic, gp_weight, clip_value, generator_optimizer,
            discriminator_optimizer, ema_decay, n_fixed_latents, seed: as in :class:`~lightning_robust.models.GAN`;
            ``loss`` must be ``"wgan-gp"`` or ``"wgan-clip"`` (NW is a Wasserstein construction).

    Raises:
        ValueError: if ``num_components < 1``, ``initial_proportions`` are negative, do not sum to one or have the
            wrong length, the loss is not a Wasserstein loss, or generated and real samples differ in shape.

    Example:
        >>> gen = nn.Linear(2, 2)                                       # affine: one Gaussian per component
        >>> critic = MLP(in_features=2, num_classes=1, hidden=(128, 128))
        >>> gan = NWGAN(gen, critic, num_components=9, latent_dim=2, loss="wgan-gp")
        >>> pl.Trainer(max_epochs=50).fit(gan, datamodule=GaussianMixtureDataModule(proportions=pi_true))
        >>> gan.proportions, gan.sample(1000)
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module,
        num_components: int = 2,
        learn_proportions: bool = True,
        initial_proportions: Sequence[float] | None = None,
        proportions_lr: float | None = None,
        reinitialise_components: bool = True,
        init_components: str = "random",
        kmeans_samples: int = 4000,
        lr_decay: bool = False,
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
        if not isinstance(generator, nn.Module):
            raise TypeError(f"generator must be an nn.Module, got {type(generator).__name__}")
        check_positive_int("num_components", num_components)
        check_seed("seed", seed)
        if loss not in ("wgan-gp", "wgan-clip"):
            raise ValueError(f"loss must be 'wgan-gp' or 'wgan-clip' for NW-GAN (a Wasserstein dual), got {loss!r}")
        if proportions_lr is not None:
            check_positive("proportions_lr", proportions_lr)
        check_choice("init_components", init_components, ("random", "kmeans"))
        check_positive_int("kmeans_samples", kmeans_samples)
        pi = MixtureProportions(num_components, initial_proportions, learnable=learn_proportions)
        if latent_dim is None:
            latent_dim = getattr(generator, "latent_dim", None)
            if not isinstance(latent_dim, int):
                raise ValueError("latent_dim must be given (the generator has no integer `latent_dim` attribute)")
        components = nn.ModuleList()
        for k in range(num_components):
            comp = copy.deepcopy(generator)
            if reinitialise_components:
                _reinitialise(comp, seed + 1000 * k)
            components.append(comp)
        super().__init__(components, discriminator, latent_dim, latent_shape, loss, n_critic, gp_weight, clip_value,
                         generator_optimizer, discriminator_optimizer, ema_decay, n_fixed_latents, seed)
        # The base saved its own arguments; record the NW ones too (primitives only).
        self.save_hyperparameters(ignore=["generator", "discriminator", "generator_optimizer",
                                          "discriminator_optimizer"])
        self.mixture = pi
        self.num_components = num_components
        self.learn_proportions = bool(learn_proportions)
        self.proportions_lr = proportions_lr
        self.lr_decay = bool(lr_decay)
        self.init_components, self.kmeans_samples = init_components, kmeans_samples
        self._checked_shapes = False

    # ---- the mixture ----------------------------------------------------------------------------------
    @property
    def components(self) -> nn.ModuleList:
        """The ``K`` component generators."""
        return self.generator  # type: ignore[return-value]

    @property
    def proportions(self) -> torch.Tensor:
        """The current mixture proportions ``π`` (detached, on the simplex)."""
        return self.mixture.proportions

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """``[K, B, ...]``: every component applied to the same latents ``z``."""
        return torch.stack([g(z) for g in self.components])

    def _nets(self, use_ema: bool) -> nn.ModuleList:
        nets = self.generator_ema if (use_ema and self.generator_ema is not None) else self.generator
        assert isinstance(nets, nn.ModuleList)
        return nets

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Samples of the mixture for latents ``z`` (components allocated by ``π``, see :meth:`sample`)."""
        return self.sample(z=z, use_ema=False)

    @torch.no_grad()
    def sample(self, n: int | None = None, z: torch.Tensor | None = None, use_ema: bool = True,
               components: torch.Tensor | None = None, return_components: bool = False) -> Any:
        """Samples of the mixture in eval mode.

        Row ``i`` comes from component ``components[i]``; by default ``≈ π_k n`` rows of each component
        (:func:`allocate_components`), the way the authors evaluate their model. Latents: ``z`` if given,
        else the fixed latents (``n`` up to their number) or fresh ones.

        Returns:
            ``samples``, or ``(samples, components)`` with ``return_components=True``.
        """
        if z is None:
            if n is None or n <= len(self.fixed_latents):
                z = self.fixed_latents[: n or len(self.fixed_latents)]
            else:
                z = self.sample_latents(n)
        z = z.to(self.device)
        comp = allocate_components(self.proportions, z.shape[0]) if components is None else components.long().cpu()
        if comp.numel() != z.shape[0]:
            raise ValueError(f"components must have one entry per latent ({z.shape[0]}), got {comp.numel()}")
        nets = self._nets(use_ema)
        out: torch.Tensor | None = None
        for k, net in enumerate(nets):
            rows = (comp == k).nonzero().flatten().to(self.device)
            if rows.numel() == 0:
                continue
            with model_mode(net, "eval"):
                part = net(z[rows])
            if out is None:
                out = part.new_empty((z.shape[0], *part.shape[1:]))
            out[rows] = part
        assert out is not None
        return (out, comp) if return_components else out

    @torch.no_grad()
    def component_samples(self, n: int, use_ema: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[K, n, ...]``: ``n`` samples of every component (e.g. the components of an NW two-sample test)."""
        z = self.sample_latents(n, generator)
        nets = self._nets(use_ema)
        outs = []
        for net in nets:
            with model_mode(net, "eval"):
                outs.append(net(z))
        return torch.stack(outs)

    def cluster(self, x: torch.Tensor, method: str = "projection", **kwargs: Any) -> torch.Tensor:
        """Adversarial clustering: the component of each point (:func:`~lightning_robust.ot.assign_to_generators`)."""
        nets = self._nets(use_ema=True)
        labels, _ = assign_to_generators(x.to(self.device), list(nets), self.latent_dim,
                                         method=method, latent_shape=self.latent_shape, **kwargs)
        return labels

    @torch.no_grad()
    def place_components(self, centers: torch.Tensor, n_latents: int = 512) -> None:
        """Shift component ``k`` so that its mean output is ``centers[k]`` (via its last ``nn.Linear``'s bias).

        Raises:
            ValueError: if ``centers`` is not ``[K, *sample_shape]`` or a component's output is not the
                flattened output of its last ``nn.Linear`` layer.
        """
        if centers.shape[0] != self.num_components:
            raise ValueError(f"centers must have num_components = {self.num_components} rows, got {centers.shape[0]}")
        z = self.sample_latents(n_latents, torch.Generator(device=self.device).manual_seed(self.seed))
        for k, comp in enumerate(self.components):
            last = [m for m in comp.modules() if isinstance(m, nn.Linear)]
            if not last or last[-1].bias is None:
                raise ValueError("place_components needs components whose last layer is an nn.Linear with a bias")
            shift = (centers[k].to(self.device) - comp(z).mean(dim=0)).flatten()
            if shift.numel() != last[-1].bias.numel():
                raise ValueError(f"component outputs have {shift.numel()} values but the last nn.Linear has "
                                 f"{last[-1].bias.numel()} biases")
            last[-1].bias.add_(shift.to(last[-1].bias.dtype))
        if self.generator_ema is not None:
            self.generator_ema.load_state_dict(self.generator.state_dict())

    def on_fit_start(self) -> None:
        if self.init_components != "kmeans" or int(self.gan_step) > 0:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            raise ValueError("init_components='kmeans' needs a datamodule (its training samples seed the k-means)")
        xs, n = [], 0
        for batch in dm.train_dataloader():
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            xs.append(x)
            n += x.shape[0]
            if n >= self.kmeans_samples:
                break
        x = torch.cat(xs)[: self.kmeans_samples].to(self.device)
        centers = kmeans(x.flatten(1), self.num_components, seed=self.seed)[1].reshape(-1, *x.shape[1:])
        centers = self.trainer.strategy.broadcast(centers, 0)
        self.place_components(centers)

    # ---- losses ---------------------------------------------------------------------------------------
    def _scores(self, fake: torch.Tensor) -> torch.Tensor:
        k, n = fake.shape[:2]
        return self._critic()(fake.flatten(0, 1)).reshape(k, n)

    def _check_shapes(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        if self._checked_shapes:
            return
        if tuple(fake.shape[2:]) != tuple(real.shape[1:]):
            raise ValueError(f"the generators produce samples of shape {tuple(fake.shape[2:])} but the real data "
                             f"has samples of shape {tuple(real.shape[1:])}")
        self._checked_shapes = True

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``-NW(real; fake, π)`` (+ gradient penalty at real/mixture interpolates); ``π`` detached."""
        self._check_shapes(real, fake)
        pi = self.mixture().detach()
        nw = normalized_wasserstein(self._critic()(real), self._scores(fake), pi)
        loss = -nw
        logs: dict[str, Any] = {"nw": nw.detach()}
        if self.loss_name == "wgan-gp" and self.gp_weight > 0:
            mix, _ = sample_mixture(fake, pi, real.shape[0], self.step_generator("mixture"))
            gp = gradient_penalty(self._critic(), real, mix, self.step_generator("gp"))
            logs["gp"] = gp.detach()
            loss = loss + self.gp_weight * gp
        return loss, logs

    def generator_loss(self, fake: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        """``-Σ_k π_k E[D(G_k(z))]``: minimised by the components and, when learned, by ``π``."""
        pi = self.mixture()
        loss = -mixture_expectation(self._scores(fake), pi)
        logs = {f"pi_{k}": p for k, p in enumerate(pi.detach())}
        return loss, logs

    def generator_parameters(self) -> list[nn.Parameter]:
        return list(self.components.parameters())

    def configure_optimizers(self) -> Any:
        gen = self.generator_parameters()
        if self.learn_proportions:
            groups: list[dict[str, Any]] = [{"params": gen}]
            pi_group: dict[str, Any] = {"params": [self.mixture.logits]}
            if self.proportions_lr is not None:
                pi_group["lr"] = self.proportions_lr
            groups.append(pi_group)
            opt_g = self.generator_optimizer_factory(groups)
        else:
            opt_g = self.generator_optimizer_factory(gen)
        opt_d = self.discriminator_optimizer_factory(self.discriminator_parameters())
        return [opt_g, opt_d]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self.lr_decay:
            return
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        total = max(1, int(self.trainer.estimated_stepping_batches))
        # The training-batch counter (part of the checkpoint) gives the same schedule after a resume; the
        # base rates live in the param groups ("initial_lr"), which the optimiser state saves and restores.
        factor = max(0.0, 1.0 - int(self.gan_step) / total)
        for opt in opts:
            for group in opt.param_groups:
                group.setdefault("initial_lr", float(group["lr"]))
                group["lr"] = float(group["initial_lr"]) * factor

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nw_proportions"] = self.proportions.tolist()

