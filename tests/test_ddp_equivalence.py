"""DDP training equals one process on the same global batches, for every LightningModule case at once.

One ``strategy="ddp"`` launch (2 CPU processes, gloo) fits every case of
:data:`tests.helpers.ddp_equivalence.CASES` in turn; the test process then fits each case's one-process
counterpart on the global batches (rank 0's batch then rank 1's) and compares the final weights. Rank-vs-rank
agreement alone holds by construction under DDP (same initialisation, all-reduced gradients); this comparison
also catches a wrong gradient reduction, a rank-dependent loss or a data split that is not DDP's.
"""

import pytest
import torch

from tests.helpers.ddp import flat_params
from tests.helpers.ddp_equivalence import CASES, fit_single, run_ddp_cases

# float32 SGD/Adam over a few steps: the two runs differ only in the order of floating-point sums.
ATOL = 2e-5


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return run_ddp_cases(sorted(CASES), tmp_path_factory.mktemp("ddp_equivalence"))


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_two_processes_match_one_process_on_the_global_batches(name, ddp_results, tmp_path):
    case = CASES[name]
    result = ddp_results[name]
    assert result["ranks_equal"], f"{name}: the two ranks' weights differ"
    single = fit_single(case, tmp_path)
    ddp = result["params"]
    initial = flat_params(case.build(1))
    assert not torch.allclose(ddp, initial, atol=100 * ATOL, rtol=0), f"{name}: DDP run did not train"
    diff = float((ddp - single).abs().max())
    assert diff <= ATOL, f"{name}: 2-process and 1-process weights differ by {diff:.3g}"
