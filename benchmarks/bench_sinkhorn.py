"""Our Sinkhorn (default arguments) against POT's ``ot.bregman.sinkhorn_log`` at equal accuracy, small ε included.

Problems: ``n`` and ``m = 3n/4`` 2-D Gaussian points, squared Euclidean cost, non-uniform weights,
``ε = {0.1, 0.01, 0.001} x`` the median cost, float64. The reference plan ``P*`` is ours run to ``tol=1e-12``
with ``method="log"`` (the tests check it against POT run to ``stopThr=1e-12``). Ours runs with its defaults
(ε-scaling, Newton steps where Sinkhorn stalls, stopping on a plan-error bound of ``1e-6``); its accuracy is
the L1 error of its plan, ``||P - P*||_1``. POT is then given an *oracle* stopping rule: the smallest iteration
count (on a 1.25x geometric grid, ``stopThr=0`` so it runs exactly that many) whose plan is at least as
accurate — a stopping rule POT does not have, so the ratio favours POT. Both are timed side by side in one
run, alternating (median of repeats), POT on the same torch tensors (its torch backend, faster here than
NumPy), one torch thread. Both include building the plan.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch

from benchmarks.common import markdown_table
from lightning_robust.ot import pairwise_cost, sinkhorn


def _interleaved(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median seconds of each function, timed in alternation so that load changes hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _problem(n: int, m: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = torch.randn(m, 2, generator=g, dtype=torch.float64) * 0.8 + 0.5
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.2
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.2
    return pairwise_cost(x, y), a / a.sum(), b / b.sum()


def run(quick: bool = False) -> str:
    import ot

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    cases = [(80, 0.1), (80, 0.01)] if quick else [(200, 0.1), (200, 0.01), (200, 0.001), (500, 0.1)]
    rows = []
    for n, rel in cases:
        m = 3 * n // 4
        C, a, b = _problem(n, m)
        reg = rel * float(C.median())
        ref = sinkhorn(C, a, b, reg=reg, tol=1e-12, method="log", max_iter=100_000).plan
        ours = sinkhorn(C, a, b, reg=reg)
        err_ours = float((ours.plan - ref).abs().sum())
        # POT continued from its own potentials (warmstart) is the same run as one of k iterations (checked),
        # so the search costs one run to the final k.
        k, done, state, err_pot = 10, 0, None, float("inf")
        while k < 1_000_000:
            P, log = ot.bregman.sinkhorn_log(a, b, C, reg, numItermax=k - done, stopThr=0.0, log=True,
                                             warmstart=state)
            state, done = (log["log_u"], log["log_v"]), k
            err_pot = float((P - ref).abs().sum())
            if err_pot <= err_ours:
                break
            k = int(k * 1.25) + 1
        t0 = time.perf_counter()
        ot.bregman.sinkhorn_log(a, b, C, reg, numItermax=k, stopThr=0.0)
        one = time.perf_counter() - t0
        repeat = 1 if one > 5 else (3 if one > 0.5 else 7)
        t = _interleaved({
            "ours": lambda C=C, a=a, b=b, reg=reg: sinkhorn(C, a, b, reg=reg).plan,
            "pot": lambda C=C, a=a, b=b, reg=reg, k=k: ot.bregman.sinkhorn_log(a, b, C, reg, numItermax=k,
                                                                               stopThr=0.0),
        }, repeat)
        rows.append([f"{n} x {m}", f"{rel:g}", ours.converged, ours.iterations, f"{err_ours:.1e}", k,
                     f"{err_pot:.1e}", t["pot"], t["ours"], t["pot"] / t["ours"]])
    return (
        "### Sinkhorn (default arguments) vs POT `sinkhorn_log` with an oracle stop at equal plan accuracy "
        "(2-D Gaussians, squared L2, non-uniform weights, float64)\n\n"
        + markdown_table(["n x m", "ε / median cost", "ours converged", "our iterations (+ Newton steps)",
                          "our plan L1 error", "POT iterations needed", "POT plan L1 error", "POT s", "ours s",
                          "speed-up (POT / ours)"], rows)
        + "\n\nPlan L1 errors are against a reference solved to `tol=1e-12`. POT's iteration count is the "
        "smallest that reaches our accuracy, found by search beforehand (POT's own marginal-only `stopThr` "
        "cannot target plan accuracy), so POT's time excludes any stopping overhead and the speed-up is a "
        "lower bound for that accuracy. Caveat: where a Newton step leaves ours far more accurate than its "
        "`tol=1e-6` asks (ε = 0.01 and 0.001 x median), POT is held to that accuracy too; at a fixed 1e-6 it would "
        "need fewer iterations, so those two speed-ups overstate the gain at equal *requested* accuracy. "
        "Measured side by side in one run on a shared 2-core machine under load from other jobs "
        f"(torch threads: {torch.get_num_threads()}; POT {ot.__version__})."
    )


if __name__ == "__main__":
    print(run(quick=True))
