"""Fast-mode run of the interpretation demo section: report text, certificate table and figure."""

import re

from PIL import Image

from lightning_robust.demo.__main__ import main


def test_interpretation_section_fast(tmp_path):
    assert main(["--out", str(tmp_path), "--fast", "--only", "interpretation"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## Interpretation: certified SmoothGrad and second-order explanations" in text
    rows = re.findall(r"^\| (0\.\d+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", text, re.M)
    assert [r[0] for r in rows] == ["0.05", "0.1", "0.2", "0.3"]
    sparse_means = [float(r[1]) for r in rows]
    assert all(0.0 <= v <= 1.0 for v in sparse_means)
    assert sparse_means == sorted(sparse_means, reverse=True)  # certificates shrink with the radius
    cos = [float(m) for m in re.findall(r"^\| \[[^]]+\] \| \d+ \| ([0-9.]+) \|", text, re.M)]
    assert cos and all(0.0 <= c <= 1.0 for c in cos)
    (fig,) = re.findall(r"\]\((figures/interpretation_[^)]+\.png)\)", text)
    with Image.open(tmp_path / fig) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300
