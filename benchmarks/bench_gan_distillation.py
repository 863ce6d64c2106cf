"""Fidelity: GAN compression by distillation (Aguinaldo et al., arXiv 1902.00159) at CPU scale.

The paper's claim: a small generator distilled from an over-parameterised teacher beats a generator of the
same size trained as a GAN from scratch. Here, on scikit-learn's 1797 real 8x8 digits (at their native size,
which keeps a WGAN-GP teacher with thousands of critic steps within a few CPU minutes):

1. a SmallCNN classifier is trained on the training split; its penultimate layer is the offline FID / KID
   feature network (Inception-v3 weights are not available offline) and its logits give the IS;
2. a teacher W-DCGAN (DCGAN nets, WGAN-GP, 5 critic steps per generator step) is trained;
3. students with three smaller capacity factors ``d`` are distilled from it with the paper's MSE loss;
4. GANs with exactly the students' generators (and the teacher's critic) are trained from scratch with the
   teacher's recipe and budget.

FID / KID are measured against the training digits with as many generated images, on the same latents
for every model. Sample grids are written to ``benchmarks/results/gan_distillation/`` (git-ignored).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import DEFAULT_SEEDS, markdown_table, mean_std, over_seeds
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.metrics import ClassifierFeatures, image_quality
from lightning_robust.models import GAN, DistilledGAN
from lightning_robust.nets import DCGANDiscriminator, DCGANGenerator, SmallCNN
from lightning_robust.utils import count_parameters
from lightning_robust.utils.plotting import image_grid

RESULTS = Path(__file__).resolve().parent / "results" / "gan_distillation"
SIZE, LATENT = 8, 100
TEACHER_D, CRITIC_D, STUDENT_DS = 128, 64, (16, 4, 1)
FULL = dict(clf_epochs=10, gan_epochs=100, distill_epochs=30)
QUICK = dict(clf_epochs=2, gan_epochs=2, distill_epochs=2)


def _adam(lr: float) -> functools.partial:
    return functools.partial(torch.optim.Adam, lr=lr, betas=(0.5, 0.9))


def _trainer(epochs: int) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)


def _classifier(x: torch.Tensor, y: torch.Tensor, epochs: int) -> SmallCNN:
    torch.manual_seed(0)
    net = SmallCNN(in_channels=1, num_classes=10, input_size=SIZE)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def _gan(d: int, seed: int) -> GAN:
    torch.manual_seed(seed)
    return GAN(DCGANGenerator(SIZE, 1, LATENT, d), DCGANDiscriminator(SIZE, 1, CRITIC_D), loss="wgan-gp", n_critic=5,
               generator_optimizer=_adam(2e-4), discriminator_optimizer=_adam(2e-4), seed=seed)


def run(quick: bool = False, seeds: Sequence[int] = DEFAULT_SEEDS) -> str:
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    cfg = QUICK if quick else FULL
    pl.seed_everything(0, verbose=False)
    # The data split and the feature net are the metric, so they stay fixed (seed 0) across seeds; the seeds
    # change every generator's initial weights and batch order.
    dm = DigitsDataModule(image_size=SIZE, channels=1, batch_size=64, val_fraction=0.0, test_fraction=0.2, seed=0)
    dm.setup("fit")
    x_tr, y_tr = (torch.stack(t) for t in zip(*[dm.train_dataset[i][:2] for i in range(len(dm.train_dataset))]))
    x_te, y_te = (torch.stack(t) for t in zip(*[dm.test_dataset[i][:2] for i in range(len(dm.test_dataset))]))
    y_tr, y_te = y_tr.long(), y_te.long()

    t0 = time.perf_counter()
    clf = _classifier(x_tr, y_tr, cfg["clf_epochs"])
    with torch.no_grad():
        clf_acc = float((clf(x_te).argmax(1) == y_te).float().mean())
    feats, logits = ClassifierFeatures(clf, "classifier.3"), ClassifierFeatures(clf, None)
    z_eval = torch.randn(len(x_tr), LATENT, generator=torch.Generator().manual_seed(1234))

    def score(module: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            fake = torch.cat([module.sample(z=zb, use_ema=False) for zb in z_eval.split(256)])  # type: ignore[operator]
        return image_quality(x_tr, fake, feats, logits, kid_subset_size=200)

    real = image_quality(x_tr, x_te, feats, logits, kid_subset_size=200)
    grids: dict[str, torch.Tensor] = {}
    meta: dict[str, tuple[object, str]] = {}

    def one_seed(seed: int) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        t = time.perf_counter()
        pl.seed_everything(seed, verbose=False)
        teacher = _gan(TEACHER_D, seed=seed)
        _trainer(cfg["gan_epochs"]).fit(teacher, datamodule=dm)
        n_teacher = count_parameters(teacher.generator)
        name = f"teacher W-DCGAN d={TEACHER_D}"
        out[name] = {**score(teacher), "s": time.perf_counter() - t}
        meta[name] = (n_teacher, "1:1")
        if seed == seeds[0]:
            grids["teacher"] = teacher.sample(z=z_eval[:8], use_ema=False)
        for d in STUDENT_DS:
            t = time.perf_counter()
            torch.manual_seed(1000 * seed + 100 + d)
            student = DistilledGAN(teacher.generator, DCGANGenerator(SIZE, 1, LATENT, d), mode="mse",
                                   generator_optimizer=_adam(1e-3), seed=1000 * seed + 100 + d)
            _trainer(cfg["distill_epochs"]).fit(student, datamodule=dm)
            name = f"distilled student d={d} (MSE)"
            out[name] = {**score(student), "s": time.perf_counter() - t}
            meta[name] = (student.student_params, f"{student.compression_ratio:.1f}:1")

            t = time.perf_counter()
            scratch = _gan(d, seed=1000 * seed + 200 + d)
            _trainer(cfg["gan_epochs"]).fit(scratch, datamodule=dm)
            name = f"same size from scratch d={d} (WGAN-GP)"
            out[name] = {**score(scratch), "s": time.perf_counter() - t}
            meta[name] = (count_parameters(scratch.generator),
                          f"{n_teacher / count_parameters(scratch.generator):.1f}:1")
            if seed == seeds[0]:
                grids[f"distilled d={d}"] = student.sample(z=z_eval[:8], use_ema=False)
                grids[f"scratch d={d}"] = scratch.sample(z=z_eval[:8], use_ema=False)
        return out

    results = over_seeds(one_seed, seeds)

    RESULTS.mkdir(parents=True, exist_ok=True)
    order = ["teacher"] + [f"{kind} d={d}" for kind in ("distilled", "scratch") for d in STUDENT_DS]
    short = {k: k.replace("distilled", "KD").replace("scratch", "GAN") for k in order}  # fits under one cell
    captions = [short[name] if i == 0 else "" for name in order for i in range(8)]
    image_grid(torch.cat([grids[k] for k in order]), captions=captions, nrow=8, cell=64,
               title=f"same latents in every row (seed {seeds[0]})").savefig(RESULTS / "samples.png")

    rows: list[list[object]] = [["held-out real digits (reference)", "-", "-", f"{real['fid']:.2f}",
                                 f"{real['kid']:.3f}", f"{real['is']:.3f}", "-"]]
    for name in results[0]:
        vals = [r[name] for r in results]
        rows.append([name, *meta[name], mean_std([v["fid"] for v in vals], 1), mean_std([v["kid"] for v in vals], 2),
                     mean_std([v["is"] for v in vals], 2), mean_std([v["s"] for v in vals], 0)])
    # Paired within a seed: the same teacher, feature net and latents for the distilled and the scratch model.
    paired = []
    for d in STUDENT_DS:
        kd = [r[f"distilled student d={d} (MSE)"]["fid"] for r in results]
        gan = [r[f"same size from scratch d={d} (WGAN-GP)"]["fid"] for r in results]
        wins = sum(k < g for k, g in zip(kd, gan))
        paired.append(f"d={d}: scratch minus distilled {mean_std([g - k for k, g in zip(kd, gan)], 1)} "
                      f"(distilled lower in {wins} of {len(seeds)} seeds; ratio "
                      f"{mean_std([g / k for k, g in zip(kd, gan)], 2)}x)")
    teacher_name = f"teacher W-DCGAN d={TEACHER_D}"
    gap16 = [r[f"distilled student d={STUDENT_DS[0]} (MSE)"]["fid"] - r[teacher_name]["fid"] for r in results]
    headers = ["generator", "parameters", "compression", "FID (smallcnn_digits)", "KID", "IS", "train s"]
    return (
        f"### GAN compression by distillation (arXiv 1902.00159), digits at {SIZE}x{SIZE}\n\n"
        f"Teacher: DCGAN generator d={TEACHER_D} (latent {LATENT}) with a d={CRITIC_D} critic, WGAN-GP, "
        f"n_critic=5, Adam 2e-4 (0.5, 0.9), {cfg['gan_epochs']} epochs of {len(dm.train_dataset)} training "
        f"digits (batch 64). Students: the paper's MSE distillation, Adam 1e-3, {cfg['distill_epochs']} "
        f"epochs. From-scratch GANs: the students' generators with the teacher's critic, recipe and budget. "
        f"Feature net: SmallCNN trained on the training digits (test accuracy {clf_acc:.3f}); FID/KID against "
        f"the {len(x_tr)} training digits with {len(x_tr)} generated images, same latents for every model "
        f"(lower is better; KID is the raw unbiased MMD^2 of these unnormalised features, not x1000, "
        f"so its scale is its own; IS of a 10-class net is at most 10). Mean ± std over {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}): each seed trains its own teacher, students and from-scratch GANs; the "
        f"data split, feature net and evaluation latents are shared by all seeds.\n\n"
        + markdown_table(headers, rows)
        + "\n\nPaired FID differences (same seed, teacher, feature net and latents; mean ± std over seeds): "
        + "; ".join(paired) + f". Distilled d={STUDENT_DS[0]} minus teacher: {mean_std(gap16, 1)}. Sample grid: "
        f"`benchmarks/results/gan_distillation/samples.png`. Total {time.perf_counter() - t0:.0f}s."
    )
