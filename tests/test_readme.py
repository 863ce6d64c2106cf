"""Every code example in README.md runs.

Each fenced ``python`` block is executed as a script in a fresh namespace, from an empty folder; every block
ends by asserting what it prints (values in range, perturbation budgets, certificate orderings), so a
block that runs but shows a wrong result fails. Each line of
a ``bash`` block that starts with ``lightning-robust`` is run in-process through ``LightningRobustCLI`` from the
repository root with ``--trainer.fast_dev_run=true``, and ``python -m lightning_robust --version`` runs in a
subprocess. ``console`` blocks are commands that need GPUs, downloaded data or earlier runs' checkpoints; the
README says so and they are not run here (tests/test_configs_all.py covers every config instead).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_robust import __version__
from lightning_robust.cli import LightningRobustCLI

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```$", README, flags=re.MULTILINE | re.DOTALL)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
CLI = [line.strip() for lang, code in BLOCKS if lang == "bash" for line in code.splitlines()
       if line.strip().startswith("lightning-robust ")]


def test_readme_has_the_documented_examples():
    assert {lang for lang, _ in BLOCKS} <= {"python", "bash", "console"}
    assert len(PYTHON) >= 3 and len(CLI) >= 3
    assert "make demo" in README and "make test" in README
    for config in re.findall(r"configs/(\w+)\.yaml", README):  # every config the README names exists
        assert (REPO / "configs" / f"{config}.yaml").is_file(), config
    # Every example checks what it shows: an assert follows each print.
    for index, code in enumerate(PYTHON):
        lines = code.splitlines()
        prints = [i for i, line in enumerate(lines) if line.startswith("print(")]
        assert all(any(line.startswith("assert ") for line in lines[i:]) for i in prints), f"block {index}"
        assert any(line.startswith("assert ") for line in lines), f"block {index} asserts nothing"


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything an example writes (logs, runs/) lands in tmp_path
    code = PYTHON[index]
    if "AutoAttack(" in code:
        pytest.importorskip("torchattacks", reason="the AutoAttack example needs `pip install --no-deps torchattacks`")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})


@pytest.mark.parametrize("line", CLI)
def test_cli_line_runs(line, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the README's paths are relative to the repository root
    argv = shlex.split(line)[1:]
    assert argv[0] == "fit", line
    cli = LightningRobustCLI(args=[*argv, "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                                   "--trainer.enable_progress_bar=false"])
    assert cli.trainer.state.finished and cli.trainer.global_step >= 1


def test_version_line_runs():
    assert "python -m lightning_robust --version" in README
    out = subprocess.run([sys.executable, "-m", "lightning_robust", "--version"], cwd=REPO, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"lightning-robust {__version__}"
