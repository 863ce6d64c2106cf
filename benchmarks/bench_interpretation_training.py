"""Fidelity of interpretation-regularized training (Levine, Singla & Feizi, arXiv 1905.12105 v1, Appendix D).

The paper trains an MNIST CNN with cross-entropy plus ``λ · MSE`` between the unit-normalized gradient
saliency maps of natural inputs and of inputs found by an L2 top-k saliency attack, and reports that the
top-25% overlap of saliency maps under that attack rises with ``λ`` while accuracy drops slightly. Here, at
CPU scale on the bundled digits (SmallCNN, 1400 training / 397 test digits), the same training
(:class:`InterpretationRegularizedClassifier`) is compared with standard training, with PGD adversarial
training, and with the two combined. Every model is attacked by the same top-k saliency attack.
"""

from __future__ import annotations

import time

import torch

from benchmarks.bench_interpretation_fidelity import _train
from benchmarks.common import markdown_table
from lightning_robust.attacks import PGD
from lightning_robust.datamodules import load_digits_tensors
from lightning_robust.interpret import TopKSaliencyAttack, gradient_saliency, topk_intersection
from lightning_robust.models import InterpretationRegularizedClassifier
from lightning_robust.nets import SmallCNN


def _saliency_robustness(net: torch.nn.Module, x: torch.Tensor, attack: TopKSaliencyAttack,
                         ) -> tuple[float, float, float]:
    """(mean top-k overlap under the attack, under random noise of the same size, share attacked)."""
    pred = net(x).argmax(1)
    k = attack.num_top(x[0].numel())
    base = gradient_saliency(net, x, pred)
    x_adv = attack(net, x, pred, generator=torch.Generator().manual_seed(1))
    moved = (x_adv != x).flatten(1).any(1)
    adv = topk_intersection(base, gradient_saliency(net, x_adv, pred), k).double() / k
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    x_rand = attack.threat.project(x + attack.eps * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1), x)
    keep = net(x_rand).argmax(1) == pred
    rand = topk_intersection(base, gradient_saliency(net, x_rand, pred), k).double() / k
    return float(adv[moved].mean()), float(rand[keep].mean()), float(moved.double().mean())


def run(quick: bool = False) -> str:
    x, y = load_digits_tensors(8, 1)
    x_tr, y_tr, x_te, y_te = x[:1400], y[:1400], x[1400:], y[1400:]
    epochs = 2 if quick else 8
    eps = 1.0
    train_attack = TopKSaliencyAttack(eps=eps, steps=5, restarts=1, search_steps=20)
    pgd = PGD(eps=eps, alpha=eps / 4, steps=7, norm="l2")
    configs = [
        ("standard training", dict(saliency_weight=0.0)),
        (f"adversarial training (PGD L2 ε={eps:g})", dict(saliency_weight=0.0, attack=pgd)),
        ("interpretation-regularized, λ=100", dict(saliency_weight=100.0, interpretation_attack=train_attack)),
        ("interpretation-regularized, λ=500", dict(saliency_weight=500.0, interpretation_attack=train_attack)),
    ]
    if quick:
        configs = configs[:1] + configs[2:3]
    eval_attack = TopKSaliencyAttack(eps=eps, steps=15 if not quick else 3, restarts=1, search_steps=50)
    n_eval = 32 if quick else 200
    rows = []
    for name, kwargs in configs:
        torch.manual_seed(0)
        model = InterpretationRegularizedClassifier(SmallCNN(input_size=8), **kwargs)  # type: ignore[arg-type]
        t0 = time.perf_counter()
        _train(model, x_tr, y_tr, epochs)
        seconds = time.perf_counter() - t0
        net = model.net
        with torch.no_grad():
            acc = float((net(x_te).argmax(1) == y_te).double().mean())
        adv, rand, share = _saliency_robustness(net, x_te[:n_eval], eval_attack)
        rows.append([name, acc, adv, rand, share, seconds])
    return (
        f"#### Interpretation-regularized vs plain and adversarial training (SmallCNN, 1400 training digits, "
        f"{epochs} epochs, Adam 2e-3; the training and evaluation attacks are top-k saliency attacks with "
        f"ε={eps:g} L2, k = 25% of the pixels, 5 and 15 steps)\n\n"
        + markdown_table(["training", "clean test accuracy", f"top-k overlap under attack ({n_eval} test digits)",
                          "top-k overlap under random L2 noise", "share attacked", "train seconds"], rows)
    )


