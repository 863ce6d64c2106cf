"""Fidelity of the interpretation methods: small-scale reproductions of the papers' central claims.

1. Levine, Singla & Feizi (arXiv 1905.12105): sparsified SmoothGrad certifies a larger top-k overlap than
   scaled SmoothGrad under L2 perturbations (bundled digits, SmallCNN).
2. Same paper, Appendix D: interpretation-regularized training makes gradient saliency maps robust to the
   top-k saliency attack, at some cost in clean accuracy; compared with plain and adversarial training
   (bundled digits).
3. Singla et al. (arXiv 1902.00407): for confident predictions the input Hessian of a ReLU network is
   nearly rank one and its top eigenvector nearly parallel to the gradient (real MNIST test split when
   ``../shared/data/MNIST`` is present, else the digits).
4. Same paper: CASO/CAFO explanations become sparser as the L1 weight grows, and the Hessian term changes
   CASO less for confident predictions.
"""

from __future__ import annotations

import gzip
import os
import struct
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table
from lightning_robust.attacks import PGD
from lightning_robust.datamodules import load_digits_tensors
from lightning_robust.interpret import (
    TopKSaliencyAttack,
    certified_topk_intersection,
    gradient_saliency,
    group_features,
    hessian_eigen_analysis,
    scaled_smoothgrad,
    sparsified_smoothgrad,
    topk_intersection,
)
from lightning_robust.models import InterpretationRegularizedClassifier
from lightning_robust.nets import SmallCNN

MNIST_RAW = Path(os.environ.get("LIGHTNING_ROBUST_SHARED_DATA",
                                Path(__file__).resolve().parents[2] / "shared" / "data")) / "MNIST" / "raw"


def _read_idx(path: Path) -> torch.Tensor:
    """An IDX file (optionally gzipped) as an uint8 tensor (LeCun's MNIST format)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).view(*dims)


def load_mnist_test() -> tuple[torch.Tensor, torch.Tensor] | None:
    """The real 10k MNIST test split as ``([N, 1, 28, 28] in [0, 1], labels)``, or None when absent."""
    images, labels = MNIST_RAW / "t10k-images-idx3-ubyte.gz", MNIST_RAW / "t10k-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        return None
    return _read_idx(images).float().div(255).unsqueeze(1), _read_idx(labels).long()


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 2e-3,
           batch_size: int = 64, seed: int = 0, loss_fn: object = None) -> torch.nn.Module:
    """A plain training loop (the same ``training_loss`` the LightningModule uses when one is given)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(batch_size):
            opt.zero_grad()
            if isinstance(model, InterpretationRegularizedClassifier):
                loss = model.training_loss(x[idx], y[idx])[0]
            else:
                loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    return model.eval()


def _digits_cnn(epochs: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    x, y = load_digits_tensors(8, 1)
    torch.manual_seed(0)
    net = _train(SmallCNN(input_size=8), x[:1400], y[:1400], epochs)
    return net, x[1400:], y[1400:]


def certificate_table(quick: bool) -> str:
    net, x, _ = _digits_cnn(3 if quick else 8)
    n_img, n = (6, 256) if quick else (32, 2048)
    x = x[:n_img]
    target = net(x).argmax(1)
    k = int(0.2 * 64)
    radii = [0.025, 0.05, 0.1, 0.2, 0.4]
    rows = []
    for sigma in (0.1, 0.25):
        gen = torch.Generator().manual_seed(0)
        maps = {"scaled SmoothGrad": scaled_smoothgrad(net, x, target, n_samples=n, sigma=sigma, batch_size=1024,
                                                       generator=gen)}
        for tau in (0.05, 0.1, 0.2):
            maps[f"sparsified SmoothGrad, τ={tau:g}"] = sparsified_smoothgrad(
                net, x, target, n_samples=n, sigma=sigma, tau=tau, batch_size=1024, generator=gen)
        for name, m in maps.items():
            cert = certified_topk_intersection(m, k, radii, sigma, n).double() / k
            rows.append([f"σ={sigma:g}", name] + [f"{cert[:, j].median():.3f} ({cert[:, j].mean():.3f})"
                                                  for j in range(len(radii))])
    return (
        f"#### Certified top-{k} overlap (k = 20% of 64 pixels), median (mean) over {n_img} test digits, "
        f"{n} noise draws, 95% confidence\n\n"
        + markdown_table(["noise", "map"] + [f"L2 radius {r:g}" for r in radii], rows)
    )


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


def training_table(quick: bool) -> str:
    x, y = load_digits_tensors(8, 1)
    x_tr, y_tr, x_te, y_te = x[:1400], y[:1400], x[1400:], y[1400:]
    epochs = 2 if quick else 10
    eps = 1.0
    train_attack = TopKSaliencyAttack(eps=eps, steps=5, restarts=1, search_steps=20)
    pgd = PGD(eps=eps, alpha=eps / 4, steps=7, norm="l2")
    configs = [
        ("standard training", dict(saliency_weight=0.0)),
        (f"adversarial training (PGD L2 ε={eps:g})", dict(saliency_weight=0.0, attack=pgd)),
        ("interpretation-regularized, λ=20", dict(saliency_weight=20.0, interpretation_attack=train_attack)),
        ("interpretation-regularized, λ=100", dict(saliency_weight=100.0, interpretation_attack=train_attack)),
        ("adversarial + interpretation, λ=100", dict(saliency_weight=100.0, attack=pgd,
                                                     interpretation_attack=train_attack)),
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
        f"{epochs} epochs, Adam 2e-3; top-k saliency attack with ε={eps:g} L2, k = 25% of pixels)\n\n"
        + markdown_table(["training", "clean test accuracy", f"top-k overlap under attack ({n_eval} test digits)",
                          "top-k overlap under random L2 noise", "share attacked", "train seconds"], rows)
    )


def _mnist_cnn(quick: bool) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    data = load_mnist_test()
    if data is None:
        net, x, y = _digits_cnn(3 if quick else 8)
        return net, x, y, "bundled digits (MNIST not found)"
    x, y = data
    n_train = 2000 if quick else 8000
    torch.manual_seed(0)
    net = _train(SmallCNN(input_size=28), x[:n_train], y[:n_train], 1 if quick else 2, lr=1e-3, batch_size=64)
    return net, x[8000:], y[8000:], f"MNIST (SmallCNN trained on the first {n_train} test images)"


def hessian_and_caso_tables(quick: bool) -> str:
    net, x, _, where = _mnist_cnn(quick)
    x = x[: 200 if quick else 1000]
    info = hessian_eigen_analysis(net, x, batch_size=512)
    conf = info.confidence
    caso = group_features(net, x, lambda1=0.0, lambda2=4.0, batch_size=512).flatten(1)
    cafo = group_features(net, x, lambda1=0.0, lambda2=4.0, second_order=False, batch_size=512).flatten(1)
    rel = (caso - cafo).norm(dim=1) / cafo.norm(dim=1).clamp_min(1e-30)
    cos_cc = F.cosine_similarity(caso, cafo)
    bins = [(0.0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 0.999), (0.999, 0.9999), (0.9999, 1.01)]
    rows = []
    for lo, hi in bins:
        m = (conf >= lo) & (conf < hi)
        if bool(m.any()):
            rows.append([f"[{lo:g}, {min(hi, 1.0):g})", int(m.sum()), float(info.cosine[m].mean()),
                         float(info.top_share[m].mean()), float(rel[m].median()), float(cos_cc[m].mean())])
    ranks = torch.stack([conf.argsort().argsort().double(), info.cosine.argsort().argsort().double()])
    spearman = float(torch.corrcoef(ranks)[0, 1])
    hess = (
        f"#### Input Hessian of a ReLU net vs prediction confidence ({where}; {len(x)} held-out images)\n\n"
        + markdown_table(["confidence", "images", "mean cos(top eigenvector, gradient)", "mean top-eigenvalue share",
                          "median ‖CASO − CAFO‖/‖CAFO‖ (λ₁=0, λ₂=4)", "mean cos(CASO, CAFO)"], rows)
        + f"\n\nSpearman rank correlation between confidence and the cosine: {spearman:.3f}."
    )
    # Sparsity against the L1 weight, on the least confident images (the others have vanishing gradients).
    sub = x[conf.argsort()[: 50 if quick else 200]]
    g = hessian_eigen_analysis(net, sub, batch_size=512).gradient.abs()
    scale = float(g.median())
    srows = []
    for mult in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):
        l1 = mult * scale
        zc = float((group_features(net, sub, lambda1=l1, lambda2=4.0, batch_size=512) == 0).double().mean())
        zf = float((group_features(net, sub, lambda1=l1, lambda2=4.0, second_order=False,
                                   batch_size=512) == 0).double().mean())
        srows.append([f"{mult:g} × median|g| = {l1:.3g}", zc, zf])
    sparsity = (
        f"#### Sparsity of CASO / CAFO explanations against the L1 weight ({len(sub)} least confident images; "
        "λ₂ = 4, 10 proximal iterations)\n\n"
        + markdown_table(["λ₁", "CASO: share of exact zeros", "CAFO: share of exact zeros"], srows)
    )
    return hess + "\n\n" + sparsity


def run(quick: bool = False) -> str:
    parts = ["### Interpretation fidelity (arXiv 1905.12105, 1902.00407)", certificate_table(quick),
             training_table(quick), hessian_and_caso_tables(quick)]
    return "\n\n".join(parts)
