"""Plain PyTorch training loops doing the same work as each LightningModule's ``training_step`` (issue 25, item 4).

A twin takes the module's own pieces (its nets, its optimizers from ``configure_optimizers``, its objectives
and loss methods, its keyed noise) and performs the same optimizer steps in the same order, without the
Trainer, the logging or the metrics. ``benchmarks/bench_training_loop.py`` times a twin against
``Trainer.fit`` of the same module; ``tests/test_benchmarks_loop_twins.py`` checks that after a few steps both
leave the same parameters, so the timing compares the same work.

* Supervised modules (:class:`~lightning_robust.models.Classifier` and its subclasses: ARD, interpretation
  regularisation, text): ``loss = Σ objectives(training_batch(batch))``, ``backward``, ``step``.
* GANs (:class:`~lightning_robust.models.GAN`: WGAN-GP, NW-GAN, entropic GAN, distilled GAN): one critic step
  on every batch (``discriminator_loss`` on fresh latents, weight clipping for ``"wgan-clip"``), one generator
  step (``generator_step_loss``, then the EMA update) when ``generator_step_due()``, then the step counter.
* :class:`~lightning_robust.models.NWDomainAdaptation`: the critic step on detached features, the ``π`` step
  (NW), the feature/classifier step with the alignment term every ``adversarial_every`` steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lightning_robust.models import GAN, Classifier, NWDomainAdaptation
from lightning_robust.models.gan import gradient_penalty
from lightning_robust.utils.batch import split_batch

__all__ = ["domain_adaptation_step", "gan_step", "plain_fit", "supervised_step", "twin_step"]

# (module, its optimizers, batch, index of the batch in the fit) -> None
Step = Callable[[Any, list[torch.optim.Optimizer], Any, int], None]


def _optimizers(model: pl.LightningModule) -> list[torch.optim.Optimizer]:
    """The module's optimizers, as ``self.optimizers()`` lists them inside a training step."""
    conf = model.configure_optimizers()
    if isinstance(conf, torch.optim.Optimizer):
        return [conf]
    if isinstance(conf, dict):
        return [conf["optimizer"]]
    if isinstance(conf, (list, tuple)) and all(isinstance(o, torch.optim.Optimizer) for o in conf):
        return list(conf)
    raise TypeError(f"configure_optimizers returned {type(conf).__name__}; the twins take optimizers without "
                    "schedulers")


def supervised_step(model: Classifier, opts: list[torch.optim.Optimizer], batch: Any, step: int) -> None:
    """One automatic-optimization step of a :class:`Classifier` (one replay: no free adversarial training)."""
    (opt,) = opts
    tb = model.training_batch(batch)
    if tb.generator is not None:  # the attacks' random starts, keyed by the optimizer step as under the Trainer
        tb.generator = model.step_generator(tb.x.device, step=step)
    loss, _ = model.objective_loss(tb)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def gan_step(model: GAN, opts: list[torch.optim.Optimizer], batch: Any, step: int) -> None:
    """One batch of :meth:`GAN.training_step`: a critic step, a generator step when due, the step counter."""
    real = model.real_from_batch(batch)
    n = real.shape[0]
    if model.discriminator is None:
        (opt_g,) = opts
    else:
        opt_g, opt_d = opts
        z = model.sample_latents(n, model.step_generator("d"))
        with torch.no_grad():
            fake = model.generate(z)
        d_loss, _ = model.discriminator_loss(real, fake)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        if model.loss_name == "wgan-clip":
            with torch.no_grad():
                for p in model.discriminator_parameters():
                    p.clamp_(-model.clip_value, model.clip_value)
    if model.discriminator is None or model.generator_step_due():
        z = model.sample_latents(n, model.step_generator("g"))
        g_loss, _ = model.generator_step_loss(z, real)
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        model.update_ema()
    model.gan_step += 1


def domain_adaptation_step(model: NWDomainAdaptation, opts: list[torch.optim.Optimizer], batch: Any,
                           step: int) -> None:
    """One batch of :meth:`NWDomainAdaptation.training_step` (``(source, target)`` batches, no per-class ones)."""
    src, tgt = model._split(batch)
    s, t = split_batch(src), split_batch(tgt)
    x_s, y_s = s.x, s.y.long()
    f_s = model.feature_extractor(x_s)
    loss = cls_loss = F.cross_entropy(model.classifier(f_s), y_s)
    if model.method != "source_only":
        opt_d = opts[1]
        f_t = model.feature_extractor(t.x)
        if model.method == "dann":
            ones, zeros = torch.ones(f_s.shape[0], device=f_s.device), torch.zeros(f_t.shape[0], device=f_t.device)
            d_loss = (F.binary_cross_entropy_with_logits(model._critic(f_s.detach()), ones)
                      + F.binary_cross_entropy_with_logits(model._critic(f_t.detach()), zeros))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            dom = (F.binary_cross_entropy_with_logits(model._critic(f_s), ones)
                   + F.binary_cross_entropy_with_logits(model._critic(f_t), zeros))
            loss = cls_loss - model.adaptation_weight * dom
        else:
            pi = model.mixture()
            fs_d, ft_d = f_s.detach(), f_t.detach()
            d_t, d_s = model._critic(ft_d), model._critic(fs_d)
            w = model._source_weights(y_s, pi.detach())
            d_loss = -(d_t.mean() - (w * d_s).sum())
            if model.critic_regularizer == "gp" and model.gp_weight > 0:
                rows = torch.multinomial(w.detach().double(), ft_d.shape[0], replacement=True,
                                         generator=model._step_generator("mix"))
                d_loss = d_loss + model.gp_weight * gradient_penalty(
                    model.critic, ft_d, fs_d[rows], model._step_generator("gp"))  # type: ignore[arg-type]
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            if model.critic_regularizer == "clip":
                with torch.no_grad():
                    for p in model.critic.parameters():  # type: ignore[union-attr]
                        p.clamp_(-model.clip_value, model.clip_value)
            if model.method == "nw":
                opt_pi = opts[2]
                pi_obj = d_t.detach().mean() - (model._source_weights(y_s, model.mixture()) * d_s.detach()).sum()
                opt_pi.zero_grad(set_to_none=True)
                pi_obj.backward()
                opt_pi.step()
            if int(model.da_step) % model.adversarial_every == 0 and model.adaptation_weight > 0:
                loss = cls_loss + model.adaptation_weight * model.alignment_objective(f_s, y_s, f_t,
                                                                                      model.mixture().detach())
    opts[0].zero_grad(set_to_none=True)
    loss.backward()
    opts[0].step()
    model.da_step += 1


def twin_step(model: pl.LightningModule) -> Step:
    """The plain-loop step doing ``model``'s training step's work.

    Every step takes ``(module, optimizers, batch, step)``, ``step`` being the index of the batch in the fit: the
    supervised twin keys the attacks' random starts by it (as the Trainer's global step does); the GANs and the
    domain adaptation keep their own step counters (``gan_step``, ``da_step``) and ignore it.
    """
    if isinstance(model, GAN):
        return gan_step
    if isinstance(model, NWDomainAdaptation):
        return domain_adaptation_step
    if isinstance(model, Classifier):
        if not model.automatic_optimization:
            raise ValueError("the supervised twin does one optimizer step per batch (no replays)")
        return supervised_step
    raise TypeError(f"no plain-loop twin for {type(model).__name__}")


def plain_fit(model: pl.LightningModule, loader: Iterable[Any], epochs: int = 1, max_steps: int | None = None) -> None:
    """Train ``model`` with its twin for ``epochs`` passes over ``loader`` (or ``max_steps`` batches)."""
    step = twin_step(model)
    opts = _optimizers(model)
    model.train()
    done = 0
    for _ in range(epochs):
        for batch in loader:
            if max_steps is not None and done >= max_steps:
                return
            step(model, opts, batch, done)
            done += 1
