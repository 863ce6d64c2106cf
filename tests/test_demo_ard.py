"""The ARD demo section in fast mode: figure written, numbers in the table sane."""

import re

import pytest
from PIL import Image

from lightning_robust.demo.__main__ import main


@pytest.mark.slow
def test_ard_section_fast(tmp_path):
    assert main(["--out", str(tmp_path), "--fast", "--only", "ard"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## Adversarially Robust Distillation" in text

    def row(name):
        cells = re.search(rf"\| {re.escape(name)} \| ([0-9.]+) \| ([0-9.]+) \|", text)
        assert cells is not None, name
        return float(cells.group(1)), float(cells.group(2))

    for name in ("teacher (SmallCNN, PGD-AT)", "student: KD", "student: AT", "student: ARD"):
        clean, robust = row(name)
        assert 0 <= robust <= clean <= 1, (name, clean, robust)
    assert row("teacher (SmallCNN, PGD-AT)")[0] > 0.5
    with Image.open(tmp_path / "figures" / "ard_accuracy.png") as im:
        assert im.format == "PNG" and im.width > 100
