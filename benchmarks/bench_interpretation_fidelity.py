"""Fidelity of the interpretation methods: small-scale reproductions of the papers' central claims.

1. Levine, Singla & Feizi (arXiv 1905.12105): sparsified SmoothGrad certifies a larger top-k overlap than
   scaled SmoothGrad under L2 perturbations (bundled digits, SmallCNN).
   (The same paper's interpretation-regularized training is measured in ``bench_interpretation_training``.)
2. Singla et al. (arXiv 1902.00407): for confident predictions the input Hessian of a ReLU network is
   nearly rank one and its top eigenvector nearly parallel to the gradient (real MNIST test split when
   ``../shared/data/MNIST`` is present, else the digits).
3. Same paper: CASO/CAFO explanations become sparser as the L1 weight grows, and the Hessian term changes
   CASO less for confident predictions.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import markdown_table
from lightning_robust.datamodules import load_digits_tensors
from lightning_robust.interpret import (
    certified_topk_intersection,
    group_features,
    hessian_eigen_analysis,
    scaled_smoothgrad,
    sparsified_smoothgrad,
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


def _mnist_cnn(quick: bool) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, str]:
    data = load_mnist_test()
    if data is None:
        net, x, y = _digits_cnn(3 if quick else 8)
        name = "bundled digits (MNIST not found)"
    else:
        x_all, y_all = data
        n_train = 2000 if quick else 8000
        torch.manual_seed(0)
        net = _train(SmallCNN(input_size=28), x_all[:n_train], y_all[:n_train], 1 if quick else 2, lr=1e-3)
        x, y = x_all[8000:], y_all[8000:]
        name = f"MNIST, SmallCNN trained on the first {n_train} test images"
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).double().mean())
    return net, x, y, f"{name}, held-out accuracy {acc:.3f}"


def hessian_and_caso_tables(quick: bool) -> str:
    net, x, _, where = _mnist_cnn(quick)
    x = x[: 200 if quick else 1000]
    info = hessian_eigen_analysis(net, x, batch_size=512)
    conf = info.confidence
    # Run the solver to convergence so that the difference measures the Hessian term, not the iterations.
    caso = group_features(net, x, lambda1=0.0, lambda2=4.0, n_iter=300, batch_size=512).flatten(1)
    cafo = group_features(net, x, lambda1=0.0, lambda2=4.0, second_order=False, batch_size=512).flatten(1)
    rel = (caso - cafo).norm(dim=1) / cafo.norm(dim=1).clamp_min(1e-30)
    cos_cc = F.cosine_similarity(caso, cafo)
    bins = [(0.0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 0.999), (0.999, 0.9999), (0.9999, 1.01)]
    rows = []
    for lo, hi in bins:
        m = (conf >= lo) & (conf < hi)
        if bool(m.any()):
            rows.append([f"[{lo:g}, {min(hi, 1.0):g})", int(m.sum()), float(info.cosine[m].mean()),
                         float(info.top_share[m].mean()), float(info.runner_up_share[m].mean()),
                         float(rel[m].median()), float(cos_cc[m].median())])
    ranks = torch.stack([conf.argsort().argsort().double(), info.cosine.argsort().argsort().double()])
    spearman = float(torch.corrcoef(ranks)[0, 1])
    ranks_ru = torch.stack([info.runner_up_share.argsort().argsort().double(), ranks[1]])
    spearman_ru = float(torch.corrcoef(ranks_ru)[0, 1])
    hess = (
        f"#### Input Hessian of a ReLU net vs prediction confidence ({where}; {len(x)} held-out images)\n\n"
        + markdown_table(["confidence", "images", "mean cos(top eigenvector, gradient)", "mean top-eigenvalue share",
                          "mean runner-up share of 1 − p_max", "median ‖CASO − CAFO‖/‖CAFO‖ (λ₁=0, λ₂=4)",
                          "median cos(CASO, CAFO)"], rows)
        + f"\n\nSpearman rank correlation of the cosine with the confidence: {spearman:.3f}; with the "
        f"runner-up share: {spearman_ru:.3f}."
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
        srows.append([f"{mult:g} × median abs(g) = {l1:.3g}", zc, zf])
    sparsity = (
        f"#### Sparsity of CASO / CAFO explanations against the L1 weight ({len(sub)} least confident images; "
        "λ₂ = 4, 10 proximal iterations)\n\n"
        + markdown_table(["λ₁", "CASO: share of exact zeros", "CAFO: share of exact zeros"], srows)
    )
    return hess + "\n\n" + sparsity


def run(quick: bool = False) -> str:
    parts = ["### Interpretation fidelity (arXiv 1905.12105, 1902.00407)", certificate_table(quick),
             hessian_and_caso_tables(quick)]
    return "\n\n".join(parts)
