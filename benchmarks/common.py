"""Timing helpers shared by the benchmarks: robust timers, this machine's matmul rate, Markdown tables."""

from __future__ import annotations

import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")

__all__ = [
    "DEFAULT_SEEDS",
    "machine_info",
    "markdown_table",
    "matmul_gflops",
    "mean_std",
    "over_seeds",
    "sync",
    "timeit",
    "update_markdown_block",
]

# Every fidelity table reports mean ± std over at least these seeds (DESIGN.md, "Fidelity runs").
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2)


def sync(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (no-op on CPU), so wall-clock times are complete."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs.

    The median resists the occasional slow run on a shared 2-core machine. ``min_time`` keeps
    repeating until that many seconds have been spent, for very short functions.
    """
    for _ in range(warmup):
        fn()
        sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < repeat or spent < min_time:
        t0 = time.perf_counter()
        fn()
        sync()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return statistics.median(times)


def matmul_gflops(n: int = 1024, dtype: torch.dtype = torch.float32, device: str = "cpu") -> float:
    """This machine's measured dense matmul rate in GFLOP/s (``2 n^3`` flops per ``n x n`` product)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    t = timeit(lambda: a @ b, repeat=7, warmup=2)
    return 2 * n**3 / t / 1e9


def machine_info() -> str:
    """One line naming the machine the numbers were taken on."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {dev}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats get 4 significant digits."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def update_markdown_block(path: str | Path, name: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- BEGIN name -->`` and ``<!-- END name -->``."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _m: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def over_seeds(fn: Callable[[int], T], seeds: Sequence[int] = DEFAULT_SEEDS) -> list[T]:
    """``[fn(seed) for seed in seeds]``, seeding torch's global generator before each call.

    ``fn`` should still seed everything it owns (data split, initial weights, attack starts) from its
    argument; the global seed only catches what it forgets.
    """
    out: list[T] = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(fn(seed))
    return out


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"m ± s"`` over seeds: mean and sample standard deviation (ddof = 1), ``digits`` decimals.

    A single value prints as ``"m (1 run)"`` so a missing spread is never mistaken for a zero one.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std: values is empty; expected one number per seed")
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f} (1 run)"
    return f"{mean:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"
