import re

from PIL import Image

from lightning_robust.demo.__main__ import main


def test_demo_fast_writes_report_with_figures(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--fast", "--only", "classifier"]) == 0
    progress = capsys.readouterr().out  # one line per section as it starts and ends, with its time
    assert re.search(r"\[1/1\] Classifier on the bundled digits done in [0-9.]+s", progress)
    text = (tmp_path / "report.md").read_text()
    assert "## Classifier on the bundled digits" in text
    acc = float(re.search(r"\| test \| ([0-9.]+) \|", text).group(1))
    assert 0.5 < acc <= 1.0  # 3 epochs already far above chance (0.1)
    figures = re.findall(r"\]\((figures/[^)]+\.png)\)", text)
    assert len(figures) >= 2
    for rel in figures:
        with Image.open(tmp_path / rel) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_unknown_section_is_an_error(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--only", "nope"])
    assert "unknown section(s) ['nope']" in capsys.readouterr().err


def test_the_tour_covers_every_method_classifier_first():
    from lightning_robust.demo.sections import SECTIONS

    names = [name for name, _, _ in SECTIONS]
    assert names[0] == "classifier"  # later sections reuse its trained digits model
    assert sorted(names) == sorted(["classifier", "attacks", "ard", "poison_filter", "interpretation", "certification",
                                    "gan_distillation", "normalized_wasserstein", "entropic_gan", "text_spgd"])
