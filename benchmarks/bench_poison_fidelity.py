"""Fidelity of the Deep k-NN defence (Peri et al., arXiv 1909.13374) against convex-polytope and
feature-collision clean-label poisons, on the authors' protocol scaled to CPU: real MNIST digits (the
10,000-image MNIST test split in ../shared/data; the bundled 8x8 digits when it is absent).

Protocol (Zhu et al.'s convex-polytope transfer setting, as Peri et al. use it; per seed):

1. Half of the split pre-trains, on clean images, an ensemble of substitute CNNs (two widths x two dropout
   rates, dropout kept on while crafting, as the authors' substitutes) and, separately, the victim CNN (another
   width and initialisation, no dropout; not in the ensemble: the authors' black-box transfer setting).
2. Fine-tuning set: 50 images per class from the other half. For each (target class, base class) pair, the
   target is a held-out image the victim classifies correctly and the bases are fixed: the first 5 base-class
   images of the fine-tuning set (the authors' default, not the nearest to the target).
3. Poisons: convex polytope (:class:`ConvexPolytope`, the authors' algorithm: Adam 0.008 per [0, 1] pixel,
   projected-gradient coefficients, eps 0.1) against the substitute ensemble; feature collision (Poison Frogs,
   white-box on the victim's extractor, as in Poison Frogs) with beta 0.05 for [0, 1] pixels and with the
   beta of Shafahi et al.'s definition, ``beta0 * 2048^2 / dim_b^2`` (beta0 = 0.25, pixels in 0..255, dim_b
   the input dimension), converted to [0, 1] pixels; a control keeps the bases clean.
4. The victim retrains its last layer (warm start, Adam lr 0.1 as the authors) on the fine-tuning set with the
   poisons (clean labels). Attack success: the target is then classified as the base class.
5. Each defence filters the fine-tuning set in the victim's feature space first: Deep k-NN at normalized
   k = k / (examples per class) in {1, 1.5, 2} (k = 50, 75, 100), L2 outlier and random eviction (5% of each
   class), one-class SVM (nu = 0.05). Detection rate = share of poisons removed, counted over the pairs where
   the undefended attack succeeded (the authors' rule) and over all pairs.

Settings that differ from the papers' (CIFAR-10, 12 ResNet/DenseNet-class substitutes, 4,000 CP steps):
MNIST-size CNNs pre-trained for one epoch, 4 substitutes, 150 CP steps with at most 8 coefficient iterations
per step (warm-started), victim head retrained for 20 epochs with the authors' Adam 0.1 and decays (they run 60),
all to fit a shared 2-core machine; a second CP
row adds the victim's own extractor to the ensemble
(grey-box), so that enough attacks succeed to count detection over them.
Peri et al. report that Deep k-NN at k = 50 removes 98.0% of the convex-polytope poisons over 102 runs
(successful attacks) and 100% for k >= 75.
"""

from __future__ import annotations

import gzip
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import DEFAULT_SEEDS, markdown_table, mean_std
from lightning_robust.attacks import ConvexPolytope, FeatureCollision, LayerFeatures, PoisonAttack
from lightning_robust.defenses import deep_knn_filter, l2_outlier_filter, one_class_svm_filter, random_eviction

SHARED = Path(os.environ.get("LIGHTNING_ROBUST_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PAIRS = [(3, 8), (1, 7), (4, 9), (5, 6), (0, 6), (2, 7), (9, 4), (7, 1), (6, 5), (8, 3)]  # (target, base)
PER_CLASS, NUM_POISONS, FRACTION = 50, 5, 0.05
NORMALIZED_K = (1.0, 1.5, 2.0)
DEFENCES = ("none", *(f"deep_knn k/n={nk:g}" for nk in NORMALIZED_K), "l2_outlier", "one_class_svm", "random")


class TinyCNN(nn.Module):
    """Two conv blocks and a 64-d feature layer (``features``); dropout after each block (on while crafting)."""

    feature_layer = "head.1"

    def __init__(self, width: int = 16, dropout: float = 0.0, in_size: int = 28) -> None:
        super().__init__()
        side = ((in_size - 4) // 2 - 4) // 2  # two 5x5 valid convolutions, each followed by a 2x2 pool
        self.body = nn.Sequential(nn.Conv2d(1, width, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout),
                                  nn.Conv2d(width, 2 * width, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Dropout(dropout))
        self.head = nn.Sequential(nn.Linear(2 * width * side * side, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_data() -> tuple[torch.Tensor, torch.Tensor, str]:
    """The real MNIST test split (IDX, gzip) when available, else the bundled digits upsampled to 28x28."""
    images = SHARED / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    labels = SHARED / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    if images.is_file() and labels.is_file():
        with gzip.open(images) as f:
            x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
        with gzip.open(labels) as f:
            y = np.frombuffer(f.read(), np.uint8, offset=8)
        return torch.tensor(x, dtype=torch.float32) / 255.0, torch.tensor(y, dtype=torch.long), "MNIST test split"
    from lightning_robust.datamodules import load_digits_tensors

    x, y = load_digits_tensors(8, 1)
    return F.interpolate(x, size=28, mode="bilinear").clamp(0, 1), y, "bundled 8x8 digits (upsampled)"


@torch.no_grad()
def features(f: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    return torch.cat([f(x[i: i + batch]) for i in range(0, len(x), batch)])


def train_cnn(net: TinyCNN, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> TinyCNN:
    """Clean pre-training (Adam 1e-3, batch 64)."""
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


def train_head(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> nn.Linear:
    """Retrain a copy of the victim's last layer on fixed features, warm start: the authors' recipe (Adam lr 0.1,
    batch 64, lr x 0.1 at 1/2 and 3/4 of the epochs; they run 60 epochs)."""
    out = nn.Linear(head.in_features, head.out_features)
    out.load_state_dict(head.state_dict())
    opt = torch.optim.Adam(out.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        if epoch in (epochs // 2, (3 * epochs) // 4):
            for group in opt.param_groups:
                group["lr"] *= 0.1
        for idx in torch.randperm(len(labels), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(out(feats[idx]), labels[idx]).backward()
            opt.step()
    return out


def paper_fc_beta(d_in: int, beta0: float = 0.25, pixel_scale: float = 255.0) -> float:
    """Shafahi et al.'s ``beta = beta0 * 2048^2 / dim_b^2`` (0..255 pixels), as the coefficient for [0, 1] pixels.

    2048 is the dimension of the Inception-v3 feature layer the formula was written for; the image term
    ``beta ||x - b||^2`` scales by ``pixel_scale^2`` when pixels go from 0..255 to [0, 1].
    """
    return beta0 * 2048**2 / d_in**2 * pixel_scale**2


@dataclass
class Settings:
    """Knobs of one fidelity run (defaults: the recorded run)."""

    seeds: tuple[int, ...] = DEFAULT_SEEDS
    pairs_per_seed: int = 7
    pretrain_epochs: int = 1
    cp_steps: int = 150
    cp_coeff_steps: int = 8
    fc_steps: int = 150
    head_epochs: int = 20


@dataclass
class Cell:
    """One (attack, defence) cell, per seed lists of per-pair outcomes."""

    success: list[list[bool]] = field(default_factory=list)
    removed: list[list[int]] = field(default_factory=list)
    clean_removed: list[list[int]] = field(default_factory=list)


def _filter(name: str, feats: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.Tensor:
    if name == "none":
        return torch.ones(len(labels), dtype=torch.bool)
    if name.startswith("deep_knn"):
        return deep_knn_filter(feats, labels, normalized_k=float(name.split("=")[1]))
    if name == "l2_outlier":
        return l2_outlier_filter(feats, labels, FRACTION)
    if name == "one_class_svm":
        return one_class_svm_filter(feats, labels, nu=FRACTION)
    return random_eviction(feats, labels, FRACTION, generator=torch.Generator().manual_seed(seed))


def evaluate(cfg: Settings) -> tuple[dict[str, dict[str, Cell]], dict[str, object]]:
    x, y, source = load_data()
    d_in = x[0].numel()
    beta_paper = paper_fc_beta(d_in)
    attack_names = ["none (bases left clean)", "convex polytope, eps 0.1, 4 substitutes (black-box)",
                    "convex polytope, eps 0.1, 4 substitutes + the victim (grey-box)", "feature collision, beta 0.05",
                    f"feature collision, Shafahi et al.'s beta ({beta_paper:.3g})"]
    cells = {a: {d: Cell() for d in DEFENCES} for a in attack_names}
    facts: dict[str, object] = {"source": source, "beta_paper": beta_paper, "d_in": d_in, "victim_acc": [],
                                "unmoved": 0, "cp_poisons": 0}
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        n = len(y)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        pre, rest = perm[: n // 2], perm[n // 2:]
        subs = [train_cnn(TinyCNN(w, p), x[pre], y[pre], cfg.pretrain_epochs, seed * 10 + i)
                for i, (w, p) in enumerate([(16, 0.2), (16, 0.3), (24, 0.2), (24, 0.3)])]
        torch.manual_seed(seed + 100)
        victim = train_cnn(TinyCNN(20, 0.0), x[pre], y[pre], cfg.pretrain_epochs, seed * 10 + 9)
        f_subs = [LayerFeatures(s, s.feature_layer) for s in subs]
        f_vic = LayerFeatures(victim, victim.feature_layer)
        head = victim.head[2]
        assert isinstance(head, nn.Linear)
        g = torch.Generator().manual_seed(seed + 1)
        ft_idx = torch.cat([rest[y[rest] == c][torch.randperm(int((y[rest] == c).sum()), generator=g)[:PER_CLASS]]
                            for c in range(10)])
        held = rest[~torch.isin(rest, ft_idx)]
        x_ft, y_ft = x[ft_idx], y[ft_idx]
        f_ft = features(f_vic, x_ft)
        f_held = features(f_vic, x[held])
        correct = head(f_held).argmax(1) == y[held]
        facts["victim_acc"].append(float(correct.float().mean()))  # type: ignore[union-attr]
        attacks: dict[str, tuple[PoisonAttack | None, list[nn.Module]]] = {
            attack_names[0]: (None, []),
            attack_names[1]: (ConvexPolytope(steps=cfg.cp_steps, eps=0.1, coeff_steps=cfg.cp_coeff_steps,
                                             dropout=True), list(f_subs)),
            attack_names[2]: (ConvexPolytope(steps=cfg.cp_steps, eps=0.1, coeff_steps=cfg.cp_coeff_steps,
                                             dropout=True), [*f_subs, f_vic]),
            attack_names[3]: (FeatureCollision(steps=cfg.fc_steps, lr=0.01, beta=0.05), [f_vic]),
            attack_names[4]: (FeatureCollision(steps=cfg.fc_steps, lr=0.01, beta=beta_paper), [f_vic]),
        }
        for a_cells in cells.values():
            for cell in a_cells.values():
                cell.success.append([])
                cell.removed.append([])
                cell.clean_removed.append([])
        order = torch.randperm(len(PAIRS), generator=torch.Generator().manual_seed(seed + 2))[: cfg.pairs_per_seed]
        for p_i in order.tolist():
            t_cls, b_cls = PAIRS[p_i]
            cands = held[(y[held] == t_cls) & correct]
            target = x[cands[int(torch.randint(len(cands), (1,), generator=g))]]
            positions = (y_ft == b_cls).nonzero().flatten()[:NUM_POISONS]  # fixed bases: the first five
            is_poison = torch.zeros(len(y_ft), dtype=torch.bool)
            is_poison[positions] = True
            f_target = features(f_vic, target[None])
            for a_name, (attack, extractors) in attacks.items():
                poisons = x_ft[positions] if attack is None else attack(extractors, x_ft[positions], target)
                if isinstance(attack, ConvexPolytope):
                    moved = (poisons - x_ft[positions]).flatten(1).abs().amax(1)
                    facts["unmoved"] = int(facts["unmoved"]) + int((moved == 0).sum())  # type: ignore[call-overload]
                    facts["cp_poisons"] = int(facts["cp_poisons"]) + len(moved)  # type: ignore[call-overload]
                feats = f_ft.clone()
                feats[positions] = features(f_vic, poisons)
                for d_name in DEFENCES:
                    keep = _filter(d_name, feats, y_ft, seed=seed * 100 + p_i)
                    victim_head = train_head(head, feats[keep], y_ft[keep], cfg.head_epochs, seed)
                    with torch.no_grad():
                        hit = int(victim_head(f_target).argmax(1)) == b_cls
                    cell = cells[a_name][d_name]
                    cell.success[-1].append(hit)
                    cell.removed[-1].append(int((~keep & is_poison).sum()))
                    cell.clean_removed[-1].append(int((~keep & ~is_poison).sum()))
            print(f"seed {seed} pair {t_cls}->{b_cls}: " + ", ".join(
                f"{a[:22]} {'hit' if cells[a]['none'].success[-1][-1] else 'miss'}" for a in attack_names), flush=True)
    return cells, facts


def _pct(values: list[float]) -> str:
    vals = [v for v in values if v == v]  # drop seeds without a successful attack (NaN)
    if not vals:
        return "n/a"
    return mean_std([100 * v for v in vals], digits=1) + ("%" if len(vals) > 1 else "")


def run(quick: bool = False) -> str:
    t_start = time.perf_counter()
    cfg = (Settings(seeds=(0,), pairs_per_seed=1, pretrain_epochs=1, cp_steps=5, cp_coeff_steps=5, fc_steps=5,
                    head_epochs=2) if quick else Settings())
    cells, facts = evaluate(cfg)
    rows = []
    for a_name, a_cells in cells.items():
        success = a_cells["none"].success  # undefended outcome decides which pairs count as successful attacks
        for d_name, cell in a_cells.items():
            per_seed_all = [sum(r) / (NUM_POISONS * len(r)) for r in cell.removed]
            per_seed_succ = [sum(r for r, s in zip(rs, ss) if s) / (NUM_POISONS * sum(ss)) if any(ss) else float("nan")
                             for rs, ss in zip(cell.removed, success)]
            n_succ = sum(map(sum, success))
            removed_succ = sum(r for rs, ss in zip(cell.removed, success) for r, s in zip(rs, ss) if s)
            n_pairs = sum(map(len, cell.success))
            rows.append([
                a_name, d_name,
                f"{sum(map(sum, cell.success))}/{n_pairs}",
                "-" if d_name == "none" else (f"{removed_succ}/{NUM_POISONS * n_succ} ({_pct(per_seed_succ)})"
                                              if n_succ else "no successful attack"),
                "-" if d_name == "none" else f"{sum(map(sum, cell.removed))}/{NUM_POISONS * n_pairs} "
                                             f"({_pct(per_seed_all)})",
                mean_std([statistics.fmean(r) for r in cell.clean_removed], digits=1),
            ])
    headers = ["poisons", "defence", "target misclassified (pairs)",
               "poisons removed, over successful attacks (per-seed mean ± std)",
               "poisons removed, over all pairs (per-seed mean ± std)", "clean images removed (of 495)"]
    accs = facts["victim_acc"]
    assert isinstance(accs, list)
    return (
        f"### Deep k-NN vs clean-label poisons on the authors' protocol ({facts['source']}, seeds "
        f"{list(cfg.seeds)}, {cfg.pairs_per_seed} target/base pairs per seed)\n\n"
        f"Per seed: 4 substitute CNNs (dropout 0.2/0.3, on while crafting) and a separately trained victim CNN "
        f"(accuracy {mean_std(accs)} on the held-out images) pre-trained on 5,000 clean images; victim's last "
        f"layer retrained on {PER_CLASS} images per class including {NUM_POISONS} poisons on fixed bases (the first "
        f"five of the base class). Convex polytope: the authors' algorithm against the substitute ensemble "
        f"(black-box for the victim; grey-box row: the victim's extractor joins the ensemble), {cfg.cp_steps} "
        f"steps (paper: 4,000), eps 0.1; {facts['unmoved']} of "
        f"{facts['cp_poisons']} CP poisons left unchanged (L-inf 0). Feature collision: white-box on the victim, "
        f"{cfg.fc_steps} steps; Shafahi et al.'s beta = 0.25 * 2048^2 / dim_b^2 for 0..255 pixels is "
        f"{facts['beta_paper']:.3g} for [0, 1] pixels at dim_b = {facts['d_in']} (0.948 at the paper's "
        f"299x299x3). Deep k-NN at normalized k = k / {PER_CLASS} in {{1, 1.5, 2}}; L2 outlier and random "
        f"eviction remove {FRACTION:.0%} per class; one-class SVM nu = {FRACTION}. The control row leaves the "
        f"bases clean (its 'removed' are false positives on the bases).\n\n"
        + markdown_table(headers, rows)
        + "\n\nPeri et al. (CIFAR-10, convex polytope, counted over successful attacks): Deep k-NN removes 98.0% of "
        f"the poisons at k = 50 over 102 runs and 100% at k >= 75. Run time {time.perf_counter() - t_start:.0f}s."
    )


if __name__ == "__main__":
    print(run(quick=True))
