"""Ratio benchmarks and fidelity runs: ``python -m benchmarks [NAME ...] [--quick] [--update]``.

Each ``benchmarks/bench_<name>.py`` defines ``run(quick: bool) -> str`` returning a Markdown block (a
table of ratios measured side by side in one run, or a fidelity table). ``--update`` writes each block
into BENCHMARKS.md between ``<!-- BEGIN <name> -->`` and ``<!-- END <name> -->`` markers.
"""
