"""GAN compression by knowledge distillation (Aguinaldo et al., arXiv 1902.00159).

A small "student" generator ``S`` learns to mimic a large, pretrained, frozen "teacher" generator ``T`` on
shared latents ``z ~ N(0, I)``:

* ``mode="mse"`` (the paper's MSE loss): ``L_S = (1/m) Σ_i mean_pixels (S(z_i) - T(z_i))^2``; no
  discriminator, every batch is one student step.
* ``mode="joint"`` (the paper's joint loss, which it needs on Celeb-A where pure MSE gives blurry faces):
  ``L_S = α · MSE(S(z), T(z)) + (1 - α) · L_adv(S(z))``, with a discriminator trained against the student
  on real data by the :class:`~lightning_robust.models.GAN` machinery (WGAN-GP by default, ``n_critic``
  critic steps per student step).

The compression ratio is ``#params(T) / #params(S)`` (generators only; the discriminator is not deployed).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_lightning.cli import OptimizerCallable
from torch import nn

from lightning_robust.models.gan import GAN, default_gan_optimizer
from lightning_robust.utils.checkpoint import CheckpointError, extract_state_dict, load_module, safe_load
from lightning_robust.utils.modules import model_mode
from lightning_robust.utils.params import count_parameters
from lightning_robust.utils.validation import check_choice, check_fraction

__all__ = ["DISTILLATION_MODES", "DistilledGAN", "compression_ratio", "distillation_loss"]

DISTILLATION_MODES = ("mse", "joint")


def distillation_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """``mean((S(z) - T(z))^2)`` over batch and pixels: the paper's MSE between student and teacher images.

    Averaging over pixels (not summing) keeps ``α`` of the joint loss independent of the image size.
    """
    if student_out.shape != teacher_out.shape:
        raise ValueError(f"student and teacher outputs differ in shape: {tuple(student_out.shape)} vs "
                         f"{tuple(teacher_out.shape)}")
    return F.mse_loss(student_out, teacher_out.detach())


def compression_ratio(teacher: nn.Module, student: nn.Module) -> float:
    """``count_parameters(teacher) / count_parameters(student)`` (e.g. 1669.0 for the paper's MNIST 1669:1)."""
    n_student = count_parameters(student)
    if n_student == 0:
        raise ValueError("student has no parameters")
    return count_parameters(teacher) / n_student


def _load_teacher(teacher: nn.Module, checkpoint: str | os.PathLike | None, prefix: str | None) -> nn.Module:
    if checkpoint is None:
        if prefix is not None:
            raise ValueError("teacher_prefix needs teacher_checkpoint")
        return teacher
    if prefix is None:
        return load_module(checkpoint, into=teacher)
    state = extract_state_dict(safe_load(checkpoint))
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        raise CheckpointError(f"no key of checkpoint {str(checkpoint)!r} starts with teacher_prefix {prefix!r} "
                              f"(keys start with {sorted(state)[:3]})")
    try:
        teacher.load_state_dict(picked, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights under {prefix!r} in {str(checkpoint)!r} do not fit "
                              f"{type(teacher).__name__}: {err}") from None
    return teacher


class DistilledGAN(GAN):
    """Compress a pretrained generator into a smaller one by distillation (arXiv 1902.00159).

    The teacher is frozen: ``requires_grad=False`` (so DDP never registers it and no optimizer sees it),
    always in eval mode (its BatchNorm uses running statistics), excluded from :meth:`generator_parameters`.
    The student is ``self.generator``, so :meth:`sample`, EMA, resume and DDP behave as in :class:`GAN`.

    Logs ``train/distill_mse`` (and ``train/adv`` in joint mode), ``train/g_loss``, ``train/d_loss`` (joint),
    and ``compression_ratio``, ``teacher_params``, ``student_params`` once per epoch.

    Args:
        teacher_generator: the teacher's architecture, pretrained unless ``teacher_checkpoint`` is given.
        student_generator: the student (same latent and output shapes, fewer parameters).
        discriminator: the critic of ``mode="joint"``; must be ``None`` for ``mode="mse"``.
        alpha: weight of the MSE term in the joint loss, ``α·MSE + (1-α)·L_adv``, in [0, 1]; unused by
            ``mode="mse"``.
        mode: ``"mse"`` or ``"joint"``.
        teacher_checkpoint: weights-only checkpoint (state dict or Lightning checkpoint, e.g. of a
            :class:`GAN` run) loaded into ``teacher_generator`` with
            :func:`~lightning_robust.utils.load_module`; ``None`` uses the module as given.
        teacher_prefix: key prefix of the teacher's weights inside the checkpoint, e.g.
            ``"generator_ema."`` to distil a GAN's EMA generator; by default the prefix is inferred
            (``"generator."`` for a GAN checkpoint).
        latent_dim, latent_shape, loss, n_critic, gp_weight, clip_value, generator_optimizer,
        discriminator_optimizer, ema_decay, n_fixed_latents, seed: as in :class:`GAN` (``loss`` and the
            critic settings matter in joint mode only).

    Raises:
        ValueError: on an unknown mode, ``alpha`` outside [0, 1], a discriminator in MSE mode or none in
            joint mode, or teacher and student outputs of different shapes.
        CheckpointError: if the teacher checkpoint is missing, not weights-only, or does not fit.

    Example:
        >>> teacher = DCGANGenerator(image_size=28, channels=1, d=64)    # trained elsewhere
        >>> student = DCGANGenerator(image_size=28, channels=1, d=2)
        >>> model = DistilledGAN(teacher, student, teacher_checkpoint="teacher.ckpt", mode="mse")
        >>> model.compression_ratio
        63.07...
    """

    def __init__(
        self,
        teacher_generator: nn.Module,
        student_generator: nn.Module,
        discriminator: nn.Module | None = None,
        alpha: float = 0.5,
        mode: str = "mse",
        teacher_checkpoint: str | None = None,
        teacher_prefix: str | None = None,
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
        check_choice("mode", mode, DISTILLATION_MODES)
        check_fraction("alpha", alpha, inclusive_high=True)
        if not isinstance(teacher_generator, nn.Module):
            raise TypeError(f"teacher_generator must be an nn.Module, got {type(teacher_generator).__name__}")
        if mode == "mse" and discriminator is not None:
            raise ValueError("mode='mse' trains no discriminator: pass discriminator=None, or use mode='joint'")
        if mode == "joint" and discriminator is None:
            raise ValueError("mode='joint' needs a discriminator for its adversarial term")
        if latent_dim is None:
            latent_dim = getattr(student_generator, "latent_dim", None) or getattr(teacher_generator, "latent_dim",
                                                                                   None)
        t_dim = getattr(teacher_generator, "latent_dim", None)
        if isinstance(t_dim, int) and isinstance(latent_dim, int) and t_dim != latent_dim:
            raise ValueError(f"teacher and student must share latents: teacher latent_dim={t_dim}, "
                             f"student latent_dim={latent_dim}")
        super().__init__(
            student_generator, discriminator, latent_dim=latent_dim, latent_shape=latent_shape, loss=loss,
            n_critic=n_critic, gp_weight=gp_weight, clip_value=clip_value,
            generator_optimizer=generator_optimizer, discriminator_optimizer=discriminator_optimizer,
            ema_decay=ema_decay, n_fixed_latents=n_fixed_latents, seed=seed,
        )
        self.mode = mode
        self.alpha = float(alpha)
        teacher = _load_teacher(teacher_generator, teacher_checkpoint, teacher_prefix)
        self.teacher = teacher.requires_grad_(False).eval()
        self._check_shapes()
        self.teacher_params = count_parameters(self.teacher)
        self.student_params = count_parameters(self.generator)
        self.compression_ratio = compression_ratio(self.teacher, self.generator)

    @torch.no_grad()
    def _check_shapes(self) -> None:
        z = torch.randn(2, self.latent_dim, *self.latent_shape, generator=torch.Generator().manual_seed(0))
        with model_mode(self.generator, "eval"):
            s, t = self.generator(z), self.teacher(z)
        if s.shape != t.shape:
            raise ValueError(f"teacher and student outputs differ in shape on the same latents: teacher "
                             f"{tuple(t.shape)}, student {tuple(s.shape)}")

    def train(self, mode: bool = True) -> DistilledGAN:
        """Switch train/eval mode; the teacher always stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_sample(self, z: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's images for latents ``z``."""
        return self.teacher(z.to(self.device))

    def generator_step_loss(self, z: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        target = self.teacher_sample(z)
        fake = self.generate(z)
        mse = distillation_loss(fake, target)
        logs: dict[str, Any] = {"distill_mse": mse.detach()}
        if self.mode == "mse":
            return mse, logs
        adv, adv_logs = self.generator_loss(fake, real)
        logs.update(adv_logs)
        logs["adv"] = adv.detach()
        return self.alpha * mse + (1.0 - self.alpha) * adv, logs

    def on_train_epoch_start(self) -> None:
        for name, value in (("compression_ratio", self.compression_ratio), ("teacher_params", self.teacher_params),
                            ("student_params", self.student_params)):
            self.log(name, float(value), on_step=False, on_epoch=True, sync_dist=True)
