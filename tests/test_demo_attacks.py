"""The attacks demo section in fast mode: figures written, numbers in the table sane."""

import re

import pytest
from PIL import Image

from lightning_robust.demo.__main__ import main


@pytest.mark.slow
def test_attacks_section_fast(tmp_path):
    assert main(["--out", str(tmp_path), "--fast", "--only", "attacks"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## Adversarial attacks and adversarial training" in text

    def row(name):
        cells = re.search(rf"\| {re.escape(name)} \| ([0-9.]+) \| ([0-9.-]+) \|", text)
        return float(cells.group(1)), cells.group(2)

    clean, clean_at = row("clean")
    assert 0.5 < float(clean_at) <= 1
    pgd, pgd_at = row("PGD-20")
    assert 0.5 < clean <= 1 and pgd < clean and float(pgd_at) > pgd  # PGD training buys PGD robustness
    assert row("ReColorAdv (RGB model)")[0] <= row("clean (RGB model)")[0]
    for name in ("attacks_pgd_examples", "attacks_recoloradv_examples", "attacks_accuracy"):
        with Image.open(tmp_path / "figures" / f"{name}.png") as im:
            assert im.format == "PNG" and im.width > 100
