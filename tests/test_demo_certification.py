"""The certification demo section in fast mode: figures written, certificate table consistent."""

import re

from PIL import Image

from lightning_robust.demo.__main__ import main


def test_certification_section_fast(tmp_path):
    assert main(["--out", str(tmp_path), "--fast", "--only", "certification"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## Robustness certificates for ReLU networks" in text
    means = {m: float(v) for m, v in re.findall(r"\| (simplex|decision boundary|global Lipschitz) \| ([0-9.e+-]+) \|",
                                                   text)}
    assert set(means) == {"simplex", "decision boundary", "global Lipschitz"}
    # the decision-boundary certificate dominates both others sample by sample, hence in the mean
    assert 0 < means["simplex"] <= means["decision boundary"]
    assert means["global Lipschitz"] <= means["decision boundary"]
    for name in ("certification_accuracy_vs_radius", "certification_radii_histogram",
                 "certification_training_histogram"):
        with Image.open(tmp_path / "figures" / f"{name}.png") as im:
            assert im.format == "PNG" and im.width > 100
