"""``python -m benchmarks.gpu --quick`` (issue 25): the one-shot GPU benchmark runs on the CPU in CI."""

import pytest


@pytest.mark.slow
def test_gpu_benchmark_quick_runs_every_case_on_the_cpu(tmp_path):
    from benchmarks import gpu

    out = tmp_path / "gpu.md"
    status = gpu.main(["--quick", "--out", str(out)])
    table = out.read_text()
    # Every module and every peer comparison has a row, none failed, every result was finite.
    for name in gpu.MODULES:
        assert name in table
    for peer in ("torchattacks.PGD", "brute force", "matmul rate", "POT", "captum"):
        assert peer in table or "not installed" in table
    assert "FAILED" not in table and "| NO |" not in table
    assert status == 0
