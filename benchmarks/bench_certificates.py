"""Simplex and decision-boundary certificates (Singla & Feizi, arXiv 1902.01235) on real MNIST vs baselines.

Nets are trained here on CPU (a few epochs, Adam) on the first 8000 images of the real MNIST test split
(``../shared/data/MNIST/raw/t10k-*.gz``, read with gzip + numpy; only the test split is available) and
certified on held-out images from the last 2000. For each net we certify the predicted class of the same
samples with

* the simplex certificate and the decision-boundary certificate (ours, ``lightning_robust.certify``);
* (a) the global Lipschitz bound ``margin / (sqrt(2) * prod ||W_l||)`` (``||e_y - e_j|| = sqrt(2)``), and the
  pairwise variant ``margin_j / (||W_y - W_j|| * prod ||W_l||)`` used inside the decision-boundary certificate;
* (b) CROWN-Ada and Fast-Lin (``benchmarks/crown.py``), radius by doubling + 14 bisection steps (MLPs only);
* (c) DDN, a minimum-norm L2 attack (300 steps + bisection along its direction): an upper bound on the true
  distance; ``tightness = certificate / attack distance`` (1 is exact; a value above 1 would be unsound).

Also reported, as a diagnostic and NOT a certificate: the local linear estimate ``margin / ||grad margin||``,
with how often it exceeds the attack distance (how often using it as a certificate would be wrong).
Times are per sample, each method run on the same batch in float64 on CPU.
"""

from __future__ import annotations

import copy
import gzip
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import DEFAULT_SEEDS, markdown_table, mean_std, over_seeds
from benchmarks.crown import crown_radius, ddn_attack, mlp_layers
from lightning_robust.certify import (
    certify,
    decision_boundary_certificate,
    lipschitz_bound,
    local_affine_map,
    local_linear_radius,
    simplex_certificate,
)
from lightning_robust.nets import MLP

RAW = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST" / "raw"


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_mnist_test(raw: Path = RAW) -> tuple[torch.Tensor, torch.Tensor] | None:
    img, lab = raw / "t10k-images-idx3-ubyte.gz", raw / "t10k-labels-idx1-ubyte.gz"
    if not (img.is_file() and lab.is_file()):
        return None
    x = torch.from_numpy(_idx(img).astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(_idx(lab).astype(np.int64))
    return x, y


def cnn_small() -> nn.Module:
    """The "small" MNIST CNN of Wong & Kolter (2018): conv16-4x4/2, conv32-4x4/2, fc100, fc10."""
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def _timed(fn: Callable[[], torch.Tensor], n: int) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    out = fn()
    return out.detach(), (time.perf_counter() - t0) / n * 1e3


def _stats(r: torch.Tensor, attack: torch.Tensor, ms: float | None) -> dict[str, float]:
    """Mean radius, median and max of certificate / attack distance over the samples, and time per sample."""
    ok = torch.isfinite(attack) & (attack > 0)
    ratio = r[ok] / attack[ok]
    return {"radius": float(r.mean()), "tight": float(ratio.median()), "max": float(ratio.max()),
            "ms": float("nan") if ms is None else ms}


METHODS = ("simplex certificate (ours)", "decision-boundary certificate (ours)",
           "(a) global Lipschitz, margin / (sqrt2 prod ||W||)", "(a') global Lipschitz, pairwise last layer",
           "(b) CROWN-Ada (bisection)", "(b) Fast-Lin (bisection)", "(c) DDN attack distance (upper bound)",
           "local linear margin/||grad|| (NOT a certificate)")


def evaluate(net: nn.Module, xs: torch.Tensor, is_mlp: bool) -> dict[str, Any]:
    """Every method on the same net and the same inputs ``xs``: per-method statistics and paired ratios."""
    net = net.double().eval()
    xs = xs.double()
    n = len(xs)
    with torch.no_grad():
        pred = net(xs).argmax(1)
    simplex_certificate(net, xs[:2])  # warm-up
    rs, t_s = _timed(lambda: simplex_certificate(net, xs), n)
    t0 = time.perf_counter()
    lb = lipschitz_bound(net, tuple(xs.shape[1:]))
    t_lip_once = time.perf_counter() - t0
    rd, t_d = _timed(lambda: decision_boundary_certificate(net, xs, lipschitz=lb), n)
    rl, t_l = _timed(lambda: certify(net, xs, method="lipschitz", lipschitz=lb), n)
    with torch.no_grad():
        logits = net(xs)
        top2 = logits.topk(2, dim=1).values
        r_naive = (top2[:, 0] - top2[:, 1]) / (math.sqrt(2) * float(lb.network))
    amap = local_affine_map(net, xs)
    lin = local_linear_radius(amap.logits, amap.weight, pred).detach()
    attack, t_a = _timed(lambda: ddn_attack(net, xs, pred), n)
    found = torch.isfinite(attack)
    out: dict[str, Any] = {
        METHODS[0]: _stats(rs, attack, t_s), METHODS[1]: _stats(rd, attack, t_d),
        METHODS[2]: _stats(r_naive, attack, None), METHODS[3]: _stats(rl, attack, t_l),
        METHODS[6]: {"radius": float(attack[found].mean()), "tight": 1.0, "max": 1.0, "ms": t_a},
        METHODS[7]: _stats(lin, attack, None),
        "lip_once_ms": t_lip_once * 1e3, "found": int(found.sum()), "n": n,
        "lin_wrong": float((lin > attack).float().mean()),
        # Paired on the same inputs: ratio of the two certificates' mean radii on this net.
        "db_over_simplex": float(rd.mean() / rs.mean()),
        "region_mean": float(amap.region_radius().mean()),
    }
    if is_mlp:
        layers = mlp_layers(net)
        crown_radius(layers, xs[:2], pred[:2])  # warm-up
        rc, t_c = _timed(lambda: crown_radius(layers, xs, pred), n)
        rf, t_f = _timed(lambda: crown_radius(layers, xs, pred, fastlin=True), n)
        out[METHODS[4]], out[METHODS[5]] = _stats(rc, attack, t_c), _stats(rf, attack, t_f)
        out["crown_over_db"] = float(rc.mean() / rd.mean())
        out["crown_speed_simplex"], out["crown_speed_db"] = t_c / t_s, t_c / t_d
    out["violations"] = sum(int((r[found] > attack[found] * (1 + 1e-9)).sum()) for r in (rs, rd, rl, r_naive))
    return out


def _table(name: str, per_seed: list[dict[str, Any]], accs: list[float], is_mlp: bool) -> str:
    """One net's table: every cell is mean ± std over the seeds (max cert/attack: the max over seeds)."""
    rows = []
    for m in METHODS:
        if m.startswith("(b)") and not is_mlp:
            continue
        vals = [r[m] for r in per_seed]
        ms = [v["ms"] for v in vals]
        note = ""
        if m == METHODS[1]:
            note = f"+ {mean_std([r['lip_once_ms'] for r in per_seed], 0)} ms once for L"
        elif m in METHODS[2:4]:
            note = "after L"
        elif m == METHODS[6]:
            note = f"found for {sum(r['found'] for r in per_seed)}/{sum(r['n'] for r in per_seed)}"
        elif m == METHODS[7]:
            note = ("exceeds the attack distance on "
                    f"{mean_std([100 * r['lin_wrong'] for r in per_seed], 0)}% of samples")
        rows.append([m, mean_std([v["radius"] for v in vals], 4), mean_std([v["tight"] for v in vals], 3),
                     f"{max(v['max'] for v in vals):.3f}",
                     "—" if any(math.isnan(t) for t in ms) else mean_std(ms, 2), note])
    if not is_mlp:
        rows.insert(4, ["(b) CROWN / Fast-Lin", "—", "—", "—", "—", "MLPs only"])
    head = (f"#### {name} (held-out accuracy {mean_std([100 * a for a in accs], 1)}%, {per_seed[0]['n']} samples "
            f"per seed; mean distance to the activation region's boundary "
            f"{mean_std([r['region_mean'] for r in per_seed], 4)})\n\n")
    return head + markdown_table(["method", "mean radius", "tightness (median cert/attack)",
                                  "max cert/attack (max over seeds)", "ms / sample", "note"], rows)


def run(quick: bool = False, seeds: Sequence[int] = DEFAULT_SEEDS) -> str:
    data = load_mnist_test()
    if data is None:
        return f"### Certificates on MNIST\n\nSkipped: the real MNIST test split is absent ({RAW})."
    x, y = data
    xtr, ytr, xte, yte = x[:8000], y[:8000], x[8000:], y[8000:]
    # 12 / 8 samples per net and seed (the one-seed run had 30 / 30): CROWN's radius search costs ~2 s a sample.
    n_mlp, n_cnn, epochs = (4, 3, 1) if quick else (12, 8, 4)
    if quick:
        xtr, ytr = xtr[:2000], ytr[:2000]
    plan: list[tuple[str, Callable[[int], nn.Module], bool]] = [
        ("MLP 784-256-256-10", lambda s: train(MLP(784, 10, (256, 256)), xtr, ytr, epochs, s), True),
        ("MLP 784-256x4-10", lambda s: train(MLP(784, 10, (256,) * 4), xtr, ytr, epochs, s), True),
        ("CNN-small (Wong & Kolter): conv16-conv32-fc100", lambda s: train(cnn_small(), xtr, ytr, epochs, s), False),
    ]

    def one_seed(seed: int) -> list[tuple[float, float, dict[str, Any]]]:
        # Each seed trains fresh nets (init and batch order) and certifies its own held-out inputs; within a
        # seed every method sees the same net and inputs, so the ratios below are paired.
        pick = torch.randperm(len(xte), generator=torch.Generator().manual_seed(1000 + seed))
        res = []
        for _name, make, is_mlp in plan:
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            net = make(seed)
            train_s = time.perf_counter() - t0
            with torch.no_grad():
                acc = float((net(xte).argmax(1) == yte).float().mean())
            n = n_mlp if is_mlp else n_cnn
            res.append((acc, train_s, evaluate(copy.deepcopy(net), xte[pick[:n]], is_mlp)))
        return res

    results = over_seeds(one_seed, seeds)
    parts = ["### Certificates on MNIST: simplex / decision boundary vs Lipschitz, CROWN, Fast-Lin and DDN\n",
             f"Real MNIST (test split: nets trained on its first 8000 images, certified on held-out ones), "
             f"float64, CPU, {len(seeds)} seeds ({', '.join(map(str, seeds))}): each seed trains fresh nets "
             f"({epochs} epochs, Adam) and certifies {n_mlp} (MLPs) / {n_cnn} (CNN) held-out images of its own; "
             "cells are mean ± std over seeds. `tightness` = certificate / DDN attack distance (median over "
             "samples); `max cert/attack` <= 1 means no certificate exceeded a distance where an adversarial "
             "example exists.\n"]
    speed, paired = [], []
    total_viol = 0
    for i, (name, _make, is_mlp) in enumerate(plan):
        per_seed = [r[i][2] for r in results]
        accs = [r[i][0] for r in results]
        parts.append(_table(name, per_seed, accs, is_mlp)
                     + f"\n\n(training: {mean_std([r[i][1] for r in results], 0)} s)\n")
        total_viol += sum(int(r["violations"]) for r in per_seed)
        paired.append(f"{name}: decision boundary / simplex = {mean_std([r['db_over_simplex'] for r in per_seed], 0)}x"
                      + (f", CROWN / decision boundary = {mean_std([r['crown_over_db'] for r in per_seed], 2)}x"
                         if is_mlp else ""))
        if is_mlp:
            speed.append(f"{name}: CROWN radius search / simplex = "
                         f"{mean_std([r['crown_speed_simplex'] for r in per_seed], 1)}x, CROWN / decision boundary = "
                         f"{mean_std([r['crown_speed_db'] for r in per_seed], 1)}x")
    parts.append("**Speed vs the paper's claim** (simplex certificate \"an order of magnitude faster than existing "
                 "methods\"), time ratios on the same inputs, mean ± std over seeds: " + "; ".join(speed) + ".\n")
    parts.append("**Radius ratios** (ratio of mean radii on the same inputs, mean ± std over seeds): "
                 + "; ".join(paired) + ".\n")
    parts.append(f"Soundness: {total_viol} certificate(s) exceeded the DDN distance over all nets, methods, "
                 f"samples and seeds.")
    return "\n".join(parts)
