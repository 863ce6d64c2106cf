"""The SPGD demo section in fast mode: a table of measured numbers, highlighted examples and a figure."""

import re

import pytest
from PIL import Image

from lightning_robust.demo.__main__ import main


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.text
def test_text_spgd_section_fast(tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("LIGHTNING_ROBUST_IMDB", str(shared_data / "IMDB"))
    assert main(["--out", str(tmp_path), "--fast", "--only", "text_spgd"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## SPGD: interpretable adversarial reviews (IMDB)" in text and "failed" not in text
    acc = float(re.search(r"test accuracy ([0-9.]+)", text).group(1))
    assert 0.5 <= acc <= 1.0
    rate = float(re.search(r"\| SPGD \(max 3 words\) \| ([0-9.]+) \|", text).group(1))
    assert 0.0 <= rate <= 1.0
    figures = re.findall(r"\]\((figures/[^)]+\.png)\)", text)
    assert figures
    for rel in figures:
        with Image.open(tmp_path / rel) as im:
            assert im.format == "PNG" and im.width > 100
    if rate > 0:  # a successful example shows its changed words in bold with the original struck through
        assert re.search(r"\*\*[^*]+\*\* \(~~[^~]+~~\)", text)
