"""Fidelity of ReColorAdv (Laidlaw & Feizi 2019, arXiv 1906.00001): Table 1 in miniature.

The paper's central claims: ReColorAdv alone lowers the accuracy of a CIFAR-10 ResNet-32 a lot, and
combining threat models (ReColorAdv + StAdv + delta) gives the strongest attack, also against adversarially
trained models. Offline we have no CIFAR-10, so the analogue is a SmallCNN on the bundled 8x8 digits as
grey RGB images (a colour attack on grey digits is a hard case: the function can only tint and re-shade
17 grey levels), standard and PGD-trained, attacked with the paper's settings: ReColorAdv in CIELUV with
a 16x32x32 grid, eps 0.06, smoothness weight 0.05, 100 Adam steps at lr 0.001, CW loss; StAdv with bound
0.05 (0.175 px at 8x8); delta = L-inf 8/255; combinations optimized jointly with the same optimizer.
Also timed: one ReColorAdv step relative to one PGD step on the same batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.bench_attacks import clock
from benchmarks.common import markdown_table
from lightning_robust.attacks import PGD, Attack, Compose, ReColorAdv, StAdv
from lightning_robust.datamodules import load_digits_tensors
from lightning_robust.nets import SmallCNN


def _train(x: torch.Tensor, y: torch.Tensor, epochs: int, attack: Attack | None) -> SmallCNN:
    torch.manual_seed(0)
    net = SmallCNN(in_channels=3, num_classes=10, input_size=8)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for idx in torch.randperm(1400, generator=g).split(64):
            xb = attack(net, x[idx], y[idx]) if attack is not None else x[idx]
            opt.zero_grad()
            F.cross_entropy(net(xb), y[idx]).backward()
            opt.step()
    return net.eval()


def _accuracy(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


def _attacks() -> dict[str, Attack | None]:
    delta = 8 / 255
    return {
        "none": None,
        "delta (PGD-20, L-inf 8/255)": PGD(eps=delta, alpha=delta / 4, steps=20),
        "StAdv": StAdv(),
        "ReColorAdv": ReColorAdv(),
        "StAdv + delta": Compose([StAdv(), PGD(eps=delta)]),
        "ReColorAdv + delta": Compose([ReColorAdv(), PGD(eps=delta)]),
        "ReColorAdv + StAdv + delta": Compose([ReColorAdv(), StAdv(), PGD(eps=delta)]),
    }


def run(quick: bool = False) -> str:
    x, y = load_digits_tensors(8, 3)
    n = 64 if quick else 256
    xt, yt = x[1400:1400 + n], y[1400:1400 + n]
    epochs = 2 if quick else 8
    nets = {
        "standard": _train(x, y, epochs, None),
        "PGD-trained (delta)": _train(x, y, epochs, PGD(eps=8 / 255, alpha=2 / 255, steps=5)),
    }
    rows = []
    for name, attack in _attacks().items():
        row: list[object] = [name]
        for net in nets.values():
            x_adv = attack(net, xt, yt) if attack is not None else xt
            row.append(_accuracy(net, x_adv, yt))
        rows.append(row)

    # Cost of one attack step, side by side on the same batch.
    net = nets["standard"]
    now = clock()
    t0 = now()
    ReColorAdv(steps=10)(net, xt, yt)
    t_recolor = now() - t0
    t0 = now()
    PGD(eps=8 / 255, steps=10, random_start=False)(net, xt, yt)
    t_pgd = now() - t0
    return (
        f"### ReColorAdv threat models on grey-RGB 8x8 digits ({n} held-out digits, SmallCNN, {epochs} epochs)\n\n"
        + markdown_table(["attack", *[f"accuracy, {k} model" for k in nets]], rows)
        + f"\n\nOne ReColorAdv step (16x32x32 grid) costs {t_recolor / t_pgd:.1f}x a PGD step on this net "
        "(the grid has 49k parameters per image against 192 pixels; on CIFAR-size nets the net dominates)."
    )
