import math
import re

from PIL import Image

from lightning_robust.demo.__main__ import main


def test_gan_distillation_section_fast(tmp_path):
    assert main(["--out", str(tmp_path), "--fast", "--only", "gan_distillation"]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "## GAN compression by distillation" in text and "(failed)" not in text
    rows = re.findall(r"\| distilled student \(d=(\d+)\) \| (\d+) \| (\d+):1 \| ([0-9.e+-]+) \|", text)
    assert [int(r[0]) for r in rows] == [16, 4, 1]
    teacher_params = int(re.search(r"\| teacher \(d=128\) \| (\d+) \|", text).group(1))
    for _, params, ratio, fid in rows:  # the printed ratio is the parameter-count ratio
        assert int(ratio) == round(teacher_params / int(params)) and math.isfinite(float(fid))
    with Image.open(tmp_path / "figures" / "gan_distillation_samples.png") as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 300
