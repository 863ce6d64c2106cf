"""NW domain adaptation under label shift with the authors' protocol (arXiv 1902.00415, section 6.1).

Source-only, DANN, Wasserstein and NW on the real MNIST test digits (grey source, colour-blend target), the
authors' classes, fractions, critic settings and class-wise source batches, 3 seeds; the table itself is
built by :func:`benchmarks.bench_normalized_wasserstein.domain_adaptation` (``NW_DA_EPOCHS`` sets the
epochs, default 10). Its own block, so that it can be rerun without the slower mixture-of-Gaussians runs.

Run: ``python -m benchmarks nw_domain_adaptation [--quick] [--update]``.
"""

from __future__ import annotations

import logging
import warnings

import torch

from benchmarks.bench_normalized_wasserstein import domain_adaptation


def run(quick: bool = False) -> str:
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    return ("**Domain adaptation under label shift, the authors' protocol (CPU scale)**\n\n"
            + domain_adaptation(quick)
            + "\n\nMeasured on a shared 2-core machine under load from other jobs (wall-clock fit seconds are "
            "inflated accordingly).")


if __name__ == "__main__":
    print(run(quick=True))
