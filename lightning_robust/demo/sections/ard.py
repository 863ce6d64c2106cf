"""Demo section: Adversarially Robust Distillation (arXiv 1905.09747) of a robust digits CNN into a tiny MLP."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from lightning_robust.attacks import PGD
from lightning_robust.datamodules import DigitsDataModule
from lightning_robust.demo.context import DemoContext
from lightning_robust.demo.report import Report
from lightning_robust.models import ARDStudent, Classifier
from lightning_robust.nets import MLP, SmallCNN
from lightning_robust.utils.plotting import bar_chart

EPS = 0.1  # L-inf budget on the 8x8 digits (17 grey levels)


def _accuracies(net: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[float, float]:
    net.eval()
    x_adv = PGD(eps=EPS, alpha=EPS / 4, steps=20)(net, x, y, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean()), float((net(x_adv).argmax(1) == y).float().mean())


def run(ctx: DemoContext, report: Report) -> None:
    """Train KD, AT and ARD students of one robust teacher; compare clean and PGD-20 accuracy."""
    epochs = 2 if ctx.fast else 12
    dm = DigitsDataModule(batch_size=64, seed=ctx.seed)
    dm.setup()
    x, y = next(iter(torch.utils.data.DataLoader(dm.test_dataset, batch_size=10_000)))  # type: ignore[arg-type]
    adam = partial(torch.optim.Adam, lr=2e-3)
    train_attack = PGD(eps=EPS, alpha=EPS / 4, steps=5)

    teacher = ctx.artifacts.get("digits_pgd_trained")  # the attacks section's PGD-trained SmallCNN
    if teacher is None:
        ctx.seed_everything()
        teacher_model = Classifier(SmallCNN(input_size=8), optimizer=adam, attack=train_attack)
        ctx.trainer("ard_teacher", max_epochs=epochs, limit_val_batches=0).fit(teacher_model, datamodule=dm)
        teacher = teacher_model.net
    teacher = teacher.eval()

    students: dict[str, nn.Module] = {}
    for name, mode in (("natural", None), ("KD", "clean"), ("AT", "at"), ("ARD", "pgd"), ("fast ARD (FGSM)", "fast")):
        ctx.seed_everything()
        net = MLP(in_features=64, num_classes=10, hidden=(64,))
        model: Classifier
        if mode is None:
            model = Classifier(net, optimizer=adam)
        elif mode == "at":
            model = Classifier(net, optimizer=adam, attack=train_attack)
        else:
            # T = 1: at this scale the paper's CIFAR-10 temperature 30 underfits (benchmarks/bench_ard_fidelity.py).
            model = ARDStudent(net, teacher, attack=train_attack, adversarial_mode=mode, temperature=1.0,
                               optimizer=adam, seed=ctx.seed)
        ctx.trainer(f"ard_{mode or 'natural'}", max_epochs=epochs).fit(model, datamodule=dm)
        students[name] = model.net

    results = {"teacher (SmallCNN, PGD-AT)": _accuracies(teacher, x, y, ctx.seed)}
    results.update({f"student: {name}": _accuracies(net, x, y, ctx.seed) for name, net in students.items()})
    sec = report.section("Adversarially Robust Distillation")
    n_student = sum(p.numel() for p in MLP(in_features=64, num_classes=10, hidden=(64,)).parameters())
    report.text(sec, (
        "`ARDStudent` (Goldblum et al., arXiv 1905.09747) distils a robust teacher (SmallCNN, PGD adversarial "
        f"training, {sum(p.numel() for p in teacher.parameters())} parameters) into an MLP student with "
        f"{n_student} parameters: the student's prediction on a PGD example of itself is pulled to the teacher's "
        "prediction on the clean image (temperature 1; the paper's CIFAR-10 value 30 underfits at this scale). "
        "Baselines: natural training, knowledge distillation on "
        f"clean images (KD), Madry adversarial training (AT). Training PGD-5, eps = {EPS}; {epochs} epochs each; "
        f"evaluation on {len(y)} held-out digits with PGD-20 (step eps/4, random start)."
    ))
    report.table(sec, ["model", "clean acc", "PGD-20 acc"], [[k, c, r] for k, (c, r) in results.items()])
    report.figure(sec, "ard_accuracy",
                  bar_chart({k.replace("student: ", "").replace(" (SmallCNN, PGD-AT)", ""): r
                             for k, (_, r) in results.items()},
                            title=f"PGD-20 accuracy, eps={EPS}", ylabel="accuracy", ylim=(0.0, 1.15)),
                  "PGD-20 accuracy of the teacher and of students of the same MLP architecture trained naturally, "
                  "by clean distillation (KD), adversarially (AT), by ARD and by fast ARD.")
    ctx.artifacts["digits_ard_student"] = students["ARD"]
