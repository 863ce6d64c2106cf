"""Demo section: adversarial examples (PGD, ReColorAdv), accuracy under attack, and PGD adversarial training."""

from __future__ import annotations

from functools import partial

import torch

from lightning_robust.attacks import FGSM, PGD, Attack, Compose, ReColorAdv, StAdv
from lightning_robust.callbacks import RobustnessEvaluation
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.demo.context import DemoContext
from lightning_robust.demo.report import Report
from lightning_robust.models import Classifier
from lightning_robust.nets import SmallCNN
from lightning_robust.utils.plotting import bar_chart, image_grid

EPS = 0.1  # L-inf budget on the 8x8 digits (17 grey levels); CIFAR-10's 8/255 would be below one grey level


def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def _fit(ctx: DemoContext, name: str, channels: int, epochs: int, attack: Attack | None) -> Classifier:
    ctx.seed_everything()
    model = Classifier(SmallCNN(in_channels=channels, num_classes=10, input_size=8),
                       optimizer=partial(torch.optim.Adam, lr=2e-3), attack=attack)
    dm = DigitsDataModule(batch_size=64, channels=channels, seed=ctx.seed)
    ctx.trainer(name, max_epochs=epochs, limit_val_batches=0).fit(model, datamodule=dm)
    return model.eval()


def _triptych(x: torch.Tensor, x_adv: torch.Tensor, pred: torch.Tensor, pred_adv: torch.Tensor, y: torch.Tensor,
              gain: float, title: str):
    """Rows: clean (prediction), adversarial (prediction), perturbation (grey = 0, amplified ``gain`` times)."""
    diff = (0.5 + gain * (x_adv - x)).clamp(0, 1)
    images = torch.cat([x, x_adv, diff])
    captions = ([f"{int(p)}" for p in pred] + [f"{int(p)}" for p in pred_adv] + ["" for _ in pred])
    correct = (pred == y).tolist() + (pred_adv == y).tolist() + [True] * len(y)
    return image_grid(images, captions, correct=correct, nrow=len(y), cell=56, title=title)


def run(ctx: DemoContext, report: Report) -> None:
    """Attack the digits classifier, show the adversarial examples, compare standard and PGD training."""
    n_eval = 48 if ctx.fast else 128
    epochs = 3 if ctx.fast else 10
    steps = 20 if ctx.fast else 100  # the functional attacks' Adam steps (paper: 100)
    dm = DigitsDataModule(batch_size=64, seed=ctx.seed)
    dm.setup()
    x, y = next(iter(torch.utils.data.DataLoader(dm.test_dataset, batch_size=n_eval)))  # type: ignore[arg-type]
    x_rgb = x.repeat(1, 3, 1, 1)

    standard = ctx.artifacts.get("digits_classifier")
    if standard is None:  # this section run alone (--only attacks)
        standard = _fit(ctx, "attacks_standard", 1, epochs, None)
    rgb = _fit(ctx, "attacks_rgb", 3, epochs, None)
    robust = _fit(ctx, "attacks_pgd_trained", 1, epochs, PGD(eps=EPS, alpha=EPS / 4, steps=5))

    pgd = PGD(eps=EPS, alpha=EPS / 4, steps=20)
    grey_attacks: dict[str, Attack] = {"FGSM": FGSM(eps=EPS), "PGD-20": pgd, "StAdv": StAdv(steps=steps)}
    colour_attacks: dict[str, Attack] = {
        "ReColorAdv": ReColorAdv(steps=steps),
        "ReColorAdv+StAdv+delta": Compose([ReColorAdv(), StAdv(), PGD(eps=8 / 255)], steps=steps),
    }
    g = torch.Generator().manual_seed(ctx.seed)
    acc_std = {"clean": _accuracy(standard, x, y)}
    acc_at = {"clean": _accuracy(robust, x, y)}
    adversarial: dict[str, torch.Tensor] = {}
    for name, attack in grey_attacks.items():
        adversarial[name] = attack(standard, x, y, generator=g)
        acc_std[name] = _accuracy(standard, adversarial[name], y)
        acc_at[name] = _accuracy(robust, attack(robust, x, y, generator=g), y)
    acc_rgb = {"clean": _accuracy(rgb, x_rgb, y)}
    for name, attack in colour_attacks.items():
        adversarial[name] = attack(rgb, x_rgb, y)
        acc_rgb[name] = _accuracy(rgb, adversarial[name], y)

    sec = report.section("Adversarial attacks and adversarial training")
    report.text(sec, (
        f"Attacks from `lightning_robust.attacks` on SmallCNNs trained on the bundled 8x8 digits ({n_eval} test "
        f"digits). L-p attacks use eps = {EPS} (L-inf); StAdv bounds the flow at 0.05 (grid units); ReColorAdv "
        "(arXiv 1906.00001) uses the paper's settings (CIELUV, 16x32x32 grid, eps 0.06, smoothness 0.05, Adam "
        f"lr 0.001, {steps} steps) on a CNN trained on the same digits as grey RGB images. The PGD-trained model "
        f"is `Classifier(attack=PGD(eps={EPS}, steps=5))` (Madry et al., arXiv 1706.06083), {epochs} epochs."
    ))
    rows = [[name, acc_std[name], acc_at[name]] for name in acc_std]
    rows += [[f"{name} (RGB model)", acc_rgb[name], "-"] for name in acc_rgb]
    report.table(sec, ["attack", "standard training", "PGD adversarial training"], rows)

    k = 8
    with torch.no_grad():
        p_clean, p_pgd = standard(x[:k]).argmax(1), standard(adversarial["PGD-20"][:k]).argmax(1)
        p_rgb, p_rec = rgb(x_rgb[:k]).argmax(1), rgb(adversarial["ReColorAdv"][:k]).argmax(1)
    report.figure(sec, "attacks_pgd_examples",
                  _triptych(x[:k], adversarial["PGD-20"][:k], p_clean, p_pgd, y[:k], 2.5,
                            f"PGD-20, eps={EPS}: clean / adversarial / perturbation x2.5"),
                  "PGD adversarial examples: top row clean digits, middle row adversarial (red: misclassified), "
                  "bottom row the perturbation (grey = 0), amplified 2.5 times.")
    report.figure(sec, "attacks_recoloradv_examples",
                  _triptych(x_rgb[:k], adversarial["ReColorAdv"][:k], p_rgb, p_rec, y[:k], 2.5,
                            "ReColorAdv: clean / recoloured / change x2.5"),
                  "ReColorAdv adversarial examples: one smooth colour function applied to every pixel "
                  "(a tint of the grey levels), with the change amplified 2.5 times.")
    report.figure(sec, "attacks_accuracy",
                  bar_chart({f"{m}: {a}": v for m, accs in (("std", acc_std), ("PGD-AT", acc_at))
                             for a, v in accs.items() if a in ("clean", "PGD-20", "StAdv")},
                            title="Accuracy under attack", ylabel="accuracy", ylim=(0.0, 1.15)),
                  "Clean, PGD-20 and StAdv accuracy of the standard and the PGD-trained model.")

    # The same numbers through the callback, as a user would log them during training.
    callback = RobustnessEvaluation({"pgd20": pgd}, num_samples=64)
    ctx.trainer("attacks_callback", callbacks=[callback], logger=False).validate(
        standard, dataloaders=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32),
        verbose=False)
    report.text(sec, (
        "`RobustnessEvaluation` on the standard model (first 64 inputs): clean "
        f"{callback.results['clean_acc']:.3f}, PGD-20 {callback.results['pgd20_acc']:.3f}, inputs with a zero "
        f"gradient {callback.results['zero_grad_fraction']:.1%}, budget violations "
        f"{int(callback.results['pgd20_violations'])}."
    ))
    ctx.artifacts["digits_pgd_trained"] = robust
