"""Fast-mode run of the poison-filter demo section: figures exist, tables hold sane measured numbers."""

import re

import pytest
from PIL import Image

from lightning_robust.demo.__main__ import main


@pytest.mark.slow
def test_poison_filter_section_fast(tmp_path):
    assert main(["--out", str(tmp_path), "--fast", "--only", "poison_filter"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## Deep k-NN poison filter" in text
    rows = re.findall(r"\| (no defence|DeepKNNPoisonFilter) \| (\d+) \| (\d) \| (yes|no) \| ([0-9.]+) \|", text)
    assert [r[0] for r in rows] == ["no defence", "DeepKNNPoisonFilter"]
    assert int(rows[0][1]) == 500 and int(rows[1][1]) < 500  # the filter removed something
    assert all(0.5 < float(r[4]) <= 1.0 for r in rows)
    removed = re.findall(r"\| Deep k-NN \(k=50\) \| (\d)/5 \| (\d+) \|", text)
    assert removed and int(removed[0][1]) < 495
    for rel in re.findall(r"\]\((figures/[^)]+\.png)\)", text):
        with Image.open(tmp_path / rel) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
