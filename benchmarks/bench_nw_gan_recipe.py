"""NW-GAN on the imbalanced 3x3 Gaussian grid with the authors' recipe (arXiv 1902.00415, section 5.1).

A plain PyTorch loop that follows the authors' ``NWGAN/gaussians`` trainer (yogeshbalaji/Normalized-
Wasserstein) setting by setting: nine components with proportions ``π_k ∝ 9 - k`` on a 3x3 grid of spacing 2,
each ``N(μ_k, T_k T_kᵀ)`` with a random anisotropic ``T_k = 0.15 N(0, 1)^{2x2}``; batches of 1024 *fresh*
samples; latent ``z ~ N(0, 0.1² I_2)``; every generator ``Linear(2, 64) - Linear(64, 64) - Linear(64, 64) -
Linear(64, 2)`` (affine, no activations); critic ``2 - 128 - 128 - 1`` with LeakyReLU(0.2); every ``Linear``
weight drawn from ``N(0, 2 / (fan_in + fan_out))`` as their ``weights_init``; critic weights clipped to ±0.01
before each critic step; RMSprop with lr 5e-5 for critic and generators and 1e-2 for the π logits, which
start at ``U(0, 1)`` (a random π); 10 critic steps per generator step (20 for the first 25 generator steps
and every 500th; 1000 in the last of the 200 epochs); one "epoch" = 500 critic steps. Evaluation as theirs:
``⌈2000/1024⌉`` batches, component ``k`` contributing ``⌊π_k 1024⌋`` samples per batch, each assigned to the
nearest true mean (:func:`~lightning_robust.ot.mixture_recovery_errors`). Their last epoch exists to measure W
with a critic trained to optimality ("we measure the wasserstein distance in the last epoch"): 1000 critic steps,
then a single generator and π step. They evaluate every 200 generator steps, so never after that step (it is
step 9907; their last evaluation is at step 9800, in epoch 198). The table's headline is therefore the end of
epoch 199 (step 9906), and the state after epoch 200 has its own rows.

Random start (theirs) against our k-means start (each generator's output shifted to one k-means centre of
4000 data points; everything else identical).

Cost. The generators have no activations, so each one *is* an affine map ``z ↦ A_k z + b_k`` with
``A_k = W_4 W_3 W_2 W_1`` (2x2); the loop draws its fakes through that collapsed map (same function, same
gradients, up to rounding) instead of four 64-wide layers per sample. What is left is the critic itself
(10,240 rows through a 128x128 layer, forward and backward, 500 times an epoch), which the recipe fixes.

Since the model's components are affine images of a Gaussian, the model is exactly the Gaussian mixture
``Σ_k π̂_k N(b_k, 0.01 A_k A_kᵀ)``; the trajectory also records the mean log-likelihood of 4000 fresh data
points under it (the true mixture's own value is the ceiling).

Resumable: every run (start x seed) is checkpointed after each epoch under ``runs/nw_gan_recipe/`` (loaded
weights-only), and the runs advance round-robin, one epoch each, so that all of them always have the same
number of epochs. ``NW_GAN_EPOCHS`` (default 3) is the epoch to reach in this call, ``NW_GAN_DEADLINE`` (unix
time, optional) stops starting new epochs after it, and the table reports the last epoch all runs reached.

Run: ``python -m benchmarks nw_gan_recipe [--quick] [--update]``.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.common import DEFAULT_SEEDS, markdown_table, mean_std
from lightning_robust.ot import kmeans, mixture_recovery_errors

K, GRID, SPACING, BATCH, NZ, Z_STD = 9, 3, 2.0, 1024, 2, 0.1
TOTAL_EPOCHS = 200  # the authors' schedule; its last epoch trains the critic 1000 steps
STARTS = ("random", "kmeans")
ROOT = Path(__file__).resolve().parents[1]
RUN_DIR = ROOT / "runs" / "nw_gan_recipe"


def _problem(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    T = torch.randn(K, 2, NZ, generator=g) * 0.15
    means = torch.tensor([[(k % GRID) * SPACING, (k // GRID) * SPACING] for k in range(K)])
    pi = torch.tensor([float(K - k) for k in range(K)])
    return means, T, T @ T.transpose(1, 2), pi / pi.sum()


def _sample(means: torch.Tensor, T: torch.Tensor, pi: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    comp = torch.multinomial(pi, n, replacement=True, generator=g)
    z = torch.randn(n, NZ, 1, generator=g)
    return means[comp] + (T[comp] @ z)[..., 0]


def _authors_init(module: nn.Module) -> None:
    # Their utils.weights_init: Linear weights ~ N(0, 2 / (fan_in + fan_out)); biases keep torch's default.
    if isinstance(module, nn.Linear):
        with torch.no_grad():
            module.weight.normal_(0.0, math.sqrt(2.0 / sum(module.weight.shape)))


def _affine(gens: nn.ModuleList) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [K, 2, NZ], b [K, 2])`` with ``gens[k](z) = A_k z + b_k`` exactly (the nets have no activations)."""
    As, bs = [], []
    for net in gens:
        assert isinstance(net, nn.Sequential)
        A: torch.Tensor | None = None
        b: torch.Tensor | None = None
        for layer in net:
            assert isinstance(layer, nn.Linear)
            A = layer.weight if A is None else layer.weight @ A
            b = layer.bias if b is None else layer.weight @ b + layer.bias
        assert A is not None and b is not None
        As.append(A)
        bs.append(b)
    return torch.stack(As), torch.stack(bs)


class _Run:
    """One training run (start, seed): nets, optimisers, RNG, counters and trajectory, checkpointable."""

    def __init__(self, seed: int, start: str) -> None:
        self.seed, self.start = seed, start
        self.means, self.T, self.covs, self.pi_true = _problem(seed)
        torch.manual_seed(seed)
        self.g = torch.Generator().manual_seed(seed)
        self.gens = nn.ModuleList(nn.Sequential(nn.Linear(NZ, 64), nn.Linear(64, 64), nn.Linear(64, 64),
                                                nn.Linear(64, 2)) for _ in range(K))
        self.critic = nn.Sequential(nn.Linear(2, 128), nn.LeakyReLU(0.2), nn.Linear(128, 128), nn.LeakyReLU(0.2),
                                    nn.Linear(128, 1))
        self.gens.apply(_authors_init)
        self.critic.apply(_authors_init)
        self.logits = nn.Parameter(torch.rand(K))
        if start == "kmeans":
            _, centres = kmeans(_sample(self.means, self.T, self.pi_true, 4000, self.g), K, seed=seed)
            with torch.no_grad():
                _, b = _affine(self.gens)
                for k, net in enumerate(self.gens):
                    assert isinstance(net, nn.Sequential) and isinstance(net[-1], nn.Linear)
                    net[-1].bias.add_(centres[k] - b[k])
        self.opt_d = torch.optim.RMSprop(self.critic.parameters(), lr=5e-5)
        self.opt_g = torch.optim.RMSprop(self.gens.parameters(), lr=5e-5)
        self.opt_pi = torch.optim.RMSprop([self.logits], lr=1e-2)
        self.epoch = self.gen_it = 0
        self.seconds = 0.0
        self.trajectory: list[dict[str, Any]] = []

    @property
    def path(self) -> Path:
        return RUN_DIR / f"{self.start}-seed{self.seed}.pt"

    def state_dict(self) -> dict[str, Any]:
        return {"gens": self.gens.state_dict(), "critic": self.critic.state_dict(), "logits": self.logits.data,
                "opt_d": self.opt_d.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_pi": self.opt_pi.state_dict(),
                "rng": self.g.get_state(), "epoch": self.epoch, "gen_it": self.gen_it, "seconds": self.seconds,
                "trajectory": self.trajectory}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".partial-{os.getpid()}")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.path)  # atomic: a killed run leaves the previous epoch's checkpoint intact

    def load(self) -> bool:
        if not self.path.exists():
            return False
        state = torch.load(self.path, weights_only=True)
        self.gens.load_state_dict(state["gens"])
        self.critic.load_state_dict(state["critic"])
        with torch.no_grad():
            self.logits.copy_(state["logits"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_pi.load_state_dict(state["opt_pi"])
        self.g.set_state(state["rng"])
        self.epoch, self.gen_it, self.seconds = int(state["epoch"]), int(state["gen_it"]), float(state["seconds"])
        self.trajectory = list(state["trajectory"])
        return True

    def _fakes(self) -> torch.Tensor:
        A, b = _affine(self.gens)
        z = torch.randn(K, BATCH, NZ, generator=self.g) * Z_STD
        return torch.baddbmm(b[:, None, :], z, A.transpose(1, 2))  # [K, BATCH, 2]

    def _weighted_critic(self, w: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        # One critic call per component: a 1024-row batch's activations stay in cache, where one 10,240-row
        # call does not (measured ~20% slower here).
        return torch.stack([self.critic(fake[k]).mean() for k in range(K)]) @ w

    def train_epoch(self) -> None:
        t0 = time.perf_counter()
        last = self.epoch == TOTAL_EPOCHS - 1
        i = 0
        while i < 500:
            d_iters = 1000 if last else 20 if self.gen_it < 25 or self.gen_it % 500 == 0 else 10
            self.critic.requires_grad_(True)
            for _ in range(d_iters):
                with torch.no_grad():
                    for p in self.critic.parameters():
                        p.clamp_(-0.01, 0.01)
                    fake = self._fakes()
                x = _sample(self.means, self.T, self.pi_true, BATCH, self.g)
                i += 1
                w = torch.softmax(self.logits.detach(), 0)
                loss_d = -(self.critic(x).mean() - self._weighted_critic(w, fake))
                self.opt_d.zero_grad()
                loss_d.backward()
                self.opt_d.step()
            # The authors freeze the critic for the generator step; it also skips its unused weight gradients.
            self.critic.requires_grad_(False)
            w = torch.softmax(self.logits, 0)
            loss_g = -self._weighted_critic(w, self._fakes())
            self.opt_g.zero_grad()
            self.opt_pi.zero_grad()
            loss_g.backward()
            self.opt_g.step()
            self.opt_pi.step()
            self.gen_it += 1
        self.critic.requires_grad_(True)
        self.epoch += 1
        self.seconds += time.perf_counter() - t0

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        # A separate generator, so that how often we evaluate does not change the training stream.
        g = torch.Generator().manual_seed(10_000 * (self.seed + 1) + self.epoch)
        w = torch.softmax(self.logits, 0)
        A, b = _affine(self.gens)
        samples = torch.cat([b[k] + Z_STD * torch.randn(BATCH, NZ, generator=g)[: int(float(w[k]) * BATCH)] @ A[k].T
                             for _ in range(math.ceil(2000 / BATCH)) for k in range(K)])
        e = mixture_recovery_errors(samples, self.means, self.covs, self.pi_true)
        # Exact log-likelihood of fresh data under the model Σ_k π̂_k N(b_k, Z_STD² A_k A_kᵀ) (float64).
        x = _sample(self.means, self.T, self.pi_true, 4000, g).double()
        model_cov = Z_STD**2 * (A @ A.transpose(1, 2)).double()
        ll_model = _mixture_loglik(x, w.double(), b.double(), model_cov)
        ll_true = _mixture_loglik(x, self.pi_true.double(), self.means.double(), self.covs.double())
        return {"epoch": self.epoch, "gen_steps": self.gen_it, "pi_error": e["pi_error"],
                "mean_error": e["mean_error"], "cov_error": e["cov_error"], "empty_modes": e["empty_modes"],
                "pi_estimate": e["pi_estimate"], "pi_model": w.tolist(), "loglik": ll_model, "loglik_true": ll_true}


def _mixture_loglik(x: torch.Tensor, pi: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> float:
    """Mean of ``log Σ_k π_k N(x; μ_k, Σ_k)`` over the rows of ``x``, exact for singular components.

    A component whose covariance is singular (a generator that collapsed its 2-d latent onto a line or a point,
    which happens during training) has no density: it puts all its mass on a null set that fresh data points
    miss almost surely, so it contributes density 0 (log-density -inf) rather than raising. Which covariances
    count as singular is decided by a Cholesky factorisation that fails (``cholesky_ex``'s ``info > 0``);
    the rest use ``log N = -½‖L⁻¹(x-μ)‖² - Σ log L_ii - (d/2) log 2π`` with ``Σ = L Lᵀ``.
    """
    d = x.shape[-1]
    L, info = torch.linalg.cholesky_ex(cov)
    ok = info == 0
    L = torch.where(ok[:, None, None], L, torch.eye(d, dtype=cov.dtype))  # placeholder factor, masked out below
    diff = (x[None, :, :] - mu[:, None, :]).transpose(1, 2)  # [K, d, N]
    maha = torch.linalg.solve_triangular(L, diff, upper=False).pow(2).sum(1)  # [K, N]
    logdet = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    logn = -0.5 * maha - logdet[:, None] - 0.5 * d * math.log(2 * math.pi)
    logn = torch.where(ok[:, None], logn, torch.full_like(logn, -math.inf))
    logp = logn.T + pi.clamp_min(1e-300).log()
    return float(torch.logsumexp(logp, dim=1).mean())


def train(target: int, seeds: tuple[int, ...] = DEFAULT_SEEDS, eval_every: int = 1,
          deadline: float | None = None, log: bool = True) -> list[_Run]:
    """Advance every (start, seed) run to ``target`` epochs, round-robin, checkpointing after each epoch."""
    runs = [_Run(s, start) for start in STARTS for s in seeds]
    for r in runs:
        if r.load() and log:
            print(f"resumed {r.path.name} at epoch {r.epoch}", flush=True)
    while True:
        todo = [r for r in runs if r.epoch < min(target, TOTAL_EPOCHS)]
        if not todo:
            break
        low = min(r.epoch for r in todo)
        for r in (r for r in todo if r.epoch == low):
            if deadline is not None and time.time() > deadline:
                return runs
            r.train_epoch()
            r.trajectory.append(r.evaluate())  # cheap (2000 samples); every epoch, so any stop has a row
            if log and (r.epoch % eval_every == 0 or r.epoch == target):
                t = r.trajectory[-1]
                print(f"{r.start} seed {r.seed} epoch {r.epoch}: empty {t['empty_modes']} pi_error "
                      f"{t['pi_error']:.4f} loglik {t['loglik']:.3f} (true {t['loglik_true']:.3f}) "
                      f"[{r.seconds:.0f}s]", flush=True)
            r.save()
    return runs


def _table(runs: list[_Run]) -> tuple[int, str, str, str]:
    common = min(r.epoch for r in runs)
    evals = {(r.start, r.seed): {t["epoch"]: t for t in r.trajectory} for r in runs}
    points = sorted(set.intersection(*(set(e) for e in evals.values())))
    names = {"random": "random start (the authors')", "kmeans": "k-means start (ours)"}
    # The headline is the end of the last *training* epoch: the authors' final epoch trains the critic 1000 steps
    # to measure W and then makes one generator step, and they evaluate every 200 generator steps, so never
    # after that step. The state after it is reported in its own rows.
    final = max((p for p in points if p < TOTAL_EPOCHS), default=0)
    rows = []

    def summary_row(label: str, ep: int, ts: list[dict[str, Any]]) -> list[Any]:
        return [label, ep, mean_std([float(t["empty_modes"]) for t in ts], 1),
                mean_std([float(t["pi_error"]) for t in ts], 4), mean_std([float(t["mean_error"]) for t in ts], 4),
                mean_std([float(t["cov_error"]) for t in ts], 5), mean_std([float(t["loglik"]) for t in ts], 2),
                mean_std([float(t["loglik_true"]) for t in ts], 2),
                "[" + ", ".join(f"{p:.2f}" for p in ts[0]["pi_estimate"]) + "]"]

    for start in STARTS:
        ts = [evals[(r.start, r.seed)][final] for r in runs if r.start == start and final]
        if ts:
            rows.append(summary_row(names[start], final, ts))
    verdict = ""
    if final and len(rows) == 2:  # paired over seeds: the two starts share data, initial weights and π start
        pairs = [(evals[("kmeans", s)][final], evals[("random", s)][final]) for s in sorted({r.seed for r in runs})]
        words = []
        for key, label in (("empty_modes", "empty modes"), ("pi_error", "π error")):
            d = torch.tensor([float(km[key]) - float(rd[key]) for km, rd in pairs], dtype=torch.float64)
            spread = float(d.std()) if len(d) > 1 else float("inf")
            lower = float(d.mean()) + spread < 0  # "beats" only where the paired difference exceeds its spread
            words.append(f"{label}: k-means − random {float(d.mean()):+.3g} ± {spread:.2g} "
                         f"({'lower beyond the spread' if lower else 'not beyond the spread'})")
        where = ("the end of the authors' training, their last evaluation point" if final == TOTAL_EPOCHS - 1
                 else "not the authors' end point")
        verdict = f"**Verdict after {final} of {TOTAL_EPOCHS} epochs ({where}):** " + "; ".join(words) + "."
        rows.append(["k-means − random, paired over seeds", final] + [
            mean_std([float(km[key]) - float(rd[key]) for km, rd in pairs], d)
            for key, d in (("empty_modes", 1), ("pi_error", 4), ("mean_error", 4), ("cov_error", 5), ("loglik", 2))
        ] + ["", ""])
    if TOTAL_EPOCHS in points:
        for start in STARTS:
            ts = [evals[(r.start, r.seed)][TOTAL_EPOCHS] for r in runs if r.start == start]
            rows.append(summary_row(f"{names[start]}, after the W-measuring last epoch", TOTAL_EPOCHS, ts))
    summary = markdown_table(["start", "epochs", "empty modes", "pi error", "mean error", "cov error",
                              "data log-lik under model", "true mixture's log-lik", "π̂ (seed 0)"], rows)
    traj_rows = []
    for ep in (p for p in points if p in (1, 2) or p % 5 == 0 or p == final):
        row: list[Any] = [ep]
        for start in STARTS:
            ts = [evals[(r.start, r.seed)][ep] for r in runs if r.start == start]
            row += [mean_std([float(t["empty_modes"]) for t in ts], 1), mean_std([float(t["pi_error"]) for t in ts], 3),
                    mean_std([float(t["loglik"]) for t in ts], 2)]
        traj_rows.append(row)
    traj = markdown_table(["epoch", "random: empty modes", "random: pi error", "random: log-lik",
                           "k-means: empty modes", "k-means: pi error", "k-means: log-lik"], traj_rows)
    return common, summary, traj, verdict


def run(quick: bool = False) -> str:
    torch.set_num_threads(1)
    if quick:  # a smoke run in a throw-away directory, never mixed with the real checkpoints
        global RUN_DIR
        saved, RUN_DIR = RUN_DIR, RUN_DIR.parent / "nw_gan_recipe_quick"
        try:
            runs = train(1, seeds=(0,), eval_every=1, log=False)
        finally:
            RUN_DIR = saved
    else:
        deadline = os.environ.get("NW_GAN_DEADLINE")
        runs = train(int(os.environ.get("NW_GAN_EPOCHS", "3")), deadline=float(deadline) if deadline else None)
    common, summary, traj, verdict = _table(runs)
    secs = sum(r.seconds for r in runs) / len(runs) / max(common, 1)
    return (f"The authors' recipe (see the module docstring), seeds {sorted({r.seed for r in runs})} (initial "
            f"weights, π start, data covariances and samples), both starts on the same seeds. **{common} of the "
            f"authors' {TOTAL_EPOCHS} epochs** (500 critic steps each) ran for every run; about {secs:.0f} s of "
            "wall-clock per epoch per run (one thread at nice 10 on a shared 2-core machine; the loop needs about "
            "11 s of a quiet core per epoch). Errors as in the authors' evaluation, lower is better; "
            "log-likelihood: mean over 4000 fresh data points under the model's exact Gaussian mixture, higher is "
            "better (it punishes components narrower than the data's without bound). Mean ± std over seeds.\n\n"
            + summary + "\n\n" + verdict + "\n\nTrajectory (mean ± std over the seeds):\n\n" + traj + "\n\n"
            + (f"Every run reached the authors' {TOTAL_EPOCHS} epochs; `NW_GAN_EPOCHS={TOTAL_EPOCHS} python -m "
               "benchmarks nw_gan_recipe --update` rebuilds this block from the per-epoch checkpoints in "
               "`runs/nw_gan_recipe/` without training." if common >= TOTAL_EPOCHS else
               f"Resume towards the authors' {TOTAL_EPOCHS} epochs with `NW_GAN_EPOCHS={TOTAL_EPOCHS} python -m "
               "benchmarks nw_gan_recipe --update` (optionally `NW_GAN_DEADLINE=<unix time>`): it continues from "
               "the per-epoch checkpoints in `runs/nw_gan_recipe/`."))


if __name__ == "__main__":
    print(run(quick=True))
