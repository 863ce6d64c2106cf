"""The entropic-GAN demo section in fast mode: figures written, numbers measured and consistent."""

import re

from PIL import Image

from lightning_robust.demo.__main__ import main


def _value(text: str, label: str) -> str:
    return re.search(re.escape(f"| {label} | ") + r"([^|]+) \|", text).group(1).strip()


def test_entropic_gan_section_fast(tmp_path):
    assert main(["--out", str(tmp_path), "--fast", "--only", "entropic_gan"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## Entropic GAN and per-sample likelihoods" in text
    assert _value(text, "bound <= Monte-Carlo estimate at every point") == "True"
    assert float(_value(text, "mean gap: Monte-Carlo log f_Y - bound (>= 0)")) >= 0
    # Training raises the bound of held-out points (the generator starts collapsed near the origin).
    assert float(_value(text, "mean bound, test points, after training")) > float(
        _value(text, "mean bound, test points, before training"))
    figures = re.findall(r"\]\((figures/entropic_gan[^)]+\.png)\)", text)
    assert len(figures) == 2
    for rel in figures:
        with Image.open(tmp_path / rel) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100
