"""Deep k-NN's CPU block size, side by side with scikit-learn's brute-force k-NN (issue 25, item 5).

``deep_knn_filter`` computes its distances one ``[rows, n]`` block at a time; topk and the exactness
checks read each block right after the matmul writes it. This times, alternating round by round on the
same data (10 Gaussian clusters in d = 512, k = 50): the default CPU block (64 MB, one reused buffer), the
former default 32 MB and a 256 MB block, and scikit-learn's ``NearestNeighbors(algorithm="brute").kneighbors``
(k + 1 neighbours, since it counts each point as its own nearest; its BLAS limited to the same one thread
through threadpoolctl).
Rates count ``2 n^2 d`` flops, over this machine's float32 matmul rate measured in each round.
``benchmarks/bench_deep_knn.py`` keeps the full n = 50,000 run.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.bench_deep_knn import _data
from benchmarks.common import markdown_table, matmul_gflops
from lightning_robust.defenses import deep_knn_filter

D = 512


def run(quick: bool = False) -> str:
    from sklearn.neighbors import NearestNeighbors
    from threadpoolctl import threadpool_limits

    n = 2_000 if quick else 8_000
    rounds = 1 if quick else 3
    x, y = _data(n, D)
    flops = 2.0 * n * n * D
    threads = torch.get_num_threads()
    cases = {
        "deep_knn_filter, 64 MB blocks (default)": lambda: deep_knn_filter(x, y, 50),
        "deep_knn_filter, 32 MB blocks": lambda: deep_knn_filter(x, y, 50, chunk_size=max(1, 32 * 2**20 // (n * 5))),
        "deep_knn_filter, 256 MB blocks": lambda: deep_knn_filter(
            x, y, 50, chunk_size=max(1, 256 * 2**20 // (n * 5))),
        "scikit-learn NearestNeighbors(brute)": lambda: NearestNeighbors(n_neighbors=51, algorithm="brute").fit(
            x.numpy()).kneighbors(x.numpy()),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    rates: list[float] = []
    with threadpool_limits(limits=threads):
        for _ in range(rounds):
            rates.append(matmul_gflops(1024))
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    rate = statistics.median(rates)
    t_sk = statistics.median(times["scikit-learn NearestNeighbors(brute)"])
    rows = []
    for name, ts in times.items():
        t = statistics.median(ts)
        rows.append([name, t, flops / t / 1e9, flops / t / 1e9 / rate, t_sk / t])
    return (
        f"### Deep k-NN block size vs scikit-learn, n = {n:,}, d = {D}, k = 50 ({threads} thread(s), median "
        f"of {rounds} alternating rounds)\n\n"
        + markdown_table(["method", "seconds", "GFLOP/s", "ratio to matmul (target >= 0.7)",
                          "speed-up vs scikit-learn (target >= 1)"], rows)
        + f"\n\nfloat32 matmul rate (median of the rounds): {rate:.1f} GFLOP/s. Measured on a 2-core machine "
        "shared with other engineers' jobs: ratios within a round are side by side, absolute times are not."
    )
