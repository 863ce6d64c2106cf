"""Demo section: compress a digits GAN by distillation (arXiv 1902.00159), with offline FID and parameter counts."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lightning_robust.callbacks import SampleGrid
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.demo.context import DemoContext
from lightning_robust.demo.report import Report
from lightning_robust.metrics import ClassifierFeatures, image_quality
from lightning_robust.models import GAN, DistilledGAN
from lightning_robust.nets import DCGANDiscriminator, DCGANGenerator, SmallCNN
from lightning_robust.utils import count_parameters
from lightning_robust.utils.plotting import image_grid

TEACHER_D, CRITIC_D, STUDENT_DS, LATENT = 128, 64, (16, 4, 1), 100


def _tensors(ds: torch.utils.data.Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[ds[i][:2] for i in range(len(ds))])  # type: ignore[arg-type]
    return torch.stack(xs), torch.as_tensor(ys).long()


def _feature_net(ctx: DemoContext, x: torch.Tensor, y: torch.Tensor) -> SmallCNN:
    """The classifier section's SmallCNN when it ran; otherwise a quick one on the same training digits."""
    clf = ctx.artifacts.get("digits_classifier")
    if clf is not None:
        return clf.net.eval()
    net = SmallCNN(in_channels=1, num_classes=10, input_size=8)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(ctx.seed)
    for _ in range(3 if ctx.fast else 10):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def run(ctx: DemoContext, report: Report) -> None:
    """Train a W-DCGAN teacher on 8x8 digits, distil it into three smaller generators, compare FID and size."""
    ctx.seed_everything()
    gan_epochs, distill_epochs = (2, 1) if ctx.fast else (100, 15)
    fit_kw = {"limit_train_batches": 6} if ctx.fast else {}
    dm = DigitsDataModule(image_size=8, batch_size=64, val_fraction=0.0, test_fraction=0.2, seed=ctx.seed)
    dm.setup("fit")
    x_tr, y_tr = _tensors(dm.train_dataset)  # type: ignore[arg-type]
    feats_net = _feature_net(ctx, x_tr, y_tr)
    feats, logits = ClassifierFeatures(feats_net, "classifier.3"), ClassifierFeatures(feats_net, None)
    x_ref = x_tr[:300] if ctx.fast else x_tr
    z = torch.randn(len(x_ref), LATENT, generator=torch.Generator().manual_seed(ctx.seed + 1))

    def quality(model: GAN) -> dict[str, float]:
        return image_quality(x_ref, model.sample(z=z, use_ema=False), feats, logits, kid_subset_size=200)

    adam = functools.partial(torch.optim.Adam, lr=2e-4, betas=(0.5, 0.9))
    teacher = GAN(DCGANGenerator(8, 1, LATENT, TEACHER_D), DCGANDiscriminator(8, 1, CRITIC_D), loss="wgan-gp",
                  n_critic=5, generator_optimizer=adam, discriminator_optimizer=adam, seed=ctx.seed)
    grid_cb = SampleGrid(num_samples=64, nrow=8, every_n_epochs=gan_epochs, prefix="teacher_samples")
    ctx.trainer("gan_teacher", max_epochs=gan_epochs, callbacks=[grid_cb], **fit_kw).fit(teacher, datamodule=dm)
    n_teacher = count_parameters(teacher.generator)
    q = quality(teacher)
    rows: list[list[object]] = [[f"teacher (d={TEACHER_D})", n_teacher, "1:1", q["fid"], q["kid"], q["is"]]]
    samples = {"teacher": teacher.sample(z=z[:8], use_ema=False)}
    for d in STUDENT_DS:
        # seed: the module's noise seed; the same value as the DataModule's, since a logger merging both
        # hparams refuses a `seed` key with two values
        student = DistilledGAN(teacher.generator, DCGANGenerator(8, 1, LATENT, d), mode="mse", seed=ctx.seed,
                               generator_optimizer=functools.partial(torch.optim.Adam, lr=1e-3, betas=(0.5, 0.9)))
        ctx.trainer(f"gan_student_d{d}", max_epochs=distill_epochs, **fit_kw).fit(student, datamodule=dm)
        q = quality(student)
        rows.append([f"distilled student (d={d})", student.student_params, f"{student.compression_ratio:.0f}:1",
                     q["fid"], q["kid"], q["is"]])
        samples[f"KD d={d}"] = student.sample(z=z[:8], use_ema=False)
    real = image_quality(x_ref, _tensors(dm.test_dataset)[0], feats, logits, kid_subset_size=200)  # type: ignore[arg-type]
    rows.append(["held-out real digits", "-", "-", real["fid"], real["kid"], real["is"]])

    sec = report.section("GAN compression by distillation")
    report.text(sec, (
        "Aguinaldo et al. (arXiv 1902.00159) compress a GAN by training a small student generator to reproduce "
        "a large teacher's images on the same latents (mean squared error). Here a W-DCGAN teacher (DCGAN nets, "
        f"WGAN-GP, 5 critic steps per generator step, {gan_epochs} epochs) learns the 8x8 digits; students with "
        f"capacity factors d = {', '.join(map(str, STUDENT_DS))} are distilled from it for {distill_epochs} epochs "
        "with `lightning_robust.models.DistilledGAN`. FID / KID use the digits SmallCNN's penultimate layer as the "
        "feature network (Inception weights are not available offline), so the scores are `fid_smallcnn_digits`: "
        "comparable with each other, not with published Inception FIDs. Lower FID/KID is better; the IS of a 10-class "
        "classifier is at most 10. The last row is the floor: held-out real digits against the training digits."
    ))
    report.table(sec, ["generator", "parameters", "compression", "FID (smallcnn_digits)", "KID", "IS"], rows)
    order = list(samples)
    captions = [name if i == 0 else "" for name in order for i in range(8)]
    report.figure(sec, "gan_distillation_samples",
                  image_grid(torch.cat([samples[k] for k in order]), captions=captions, nrow=8, cell=64,
                             title="same latents in every row"),
                  "Teacher and distilled students (KD d=16, 4, 1) on the same 8 latents: each student reproduces "
                  "its teacher's digit.")
    ctx.artifacts["digits_gan_teacher"] = teacher
