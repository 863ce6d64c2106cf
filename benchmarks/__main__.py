"""Run the benchmarks: ``python -m benchmarks [NAME ...] [--quick] [--update] [--list]``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import time
from pathlib import Path

import benchmarks
from benchmarks.common import machine_info, update_markdown_block

ROOT = Path(__file__).resolve().parents[1]


def available() -> list[str]:
    return sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__)
                  if m.name.startswith("bench_"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--update", action="store_true", help="write results into BENCHMARKS.md")
    parser.add_argument("--list", action="store_true", help="list benchmark names and exit")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="Markdown file to update")
    args = parser.parse_args(argv)
    names = available()
    if args.list:
        print("\n".join(names))
        return 0
    unknown = sorted(set(args.names) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {names}")
    for name in args.names or names:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        body = module.run(quick=args.quick)
        stamp = f"\n\n_Measured {time.strftime('%Y-%m-%d')} in {time.perf_counter() - t0:.0f}s on: {machine_info()}._"
        print(body + stamp, flush=True)
        if args.update and not args.quick:
            update_markdown_block(args.out, name, body + stamp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
