"""``python -m lightning_robust.demo``: a tour of the library at CPU scale, written as a report."""
