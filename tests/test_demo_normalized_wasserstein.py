"""The NW demo section in fast mode: report, figures and sane numbers."""

import re

from PIL import Image

from lightning_robust.demo.__main__ import main


def test_nw_demo_section_fast(tmp_path):
    assert main(["--out", str(tmp_path), "--fast", "--only", "normalized_wasserstein"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## Normalized Wasserstein: NW-GAN learns mixture proportions" in text
    rows = dict(re.findall(r"\| (NW-GAN \(learned π\)|fixed uniform π) \| ([0-9.e-]+) \|", text))
    assert set(rows) == {"NW-GAN (learned π)", "fixed uniform π"}
    # With one component per mode, uniform π scores ≈ 0.21 on (9-k)/45; drifting components change it a little.
    assert 0.05 < float(rows["fixed uniform π"]) < 1.0
    assert 0.0 <= float(rows["NW-GAN (learned π)"]) < 5.0
    figures = re.findall(r"\]\((figures/[^)]+\.png)\)", text)
    assert len(figures) == 2
    for rel in figures:
        with Image.open(tmp_path / rel) as im:
            assert im.format == "PNG" and im.width > 100
