"""Every module: N epochs straight == N/2 epochs, checkpoint, resume in a new process, N/2 epochs.

Weights, optimizer states, loop counters, callback states and random-generator states must be identical
(CPU, deterministic mode). Two subprocesses serve all cases (each costs seconds of start-up).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_robust.utils import safe_load
from tests.helpers.ddp import REPO
from tests.reliability.resume_cases import CASES

# Keys that legitimately differ: the Trainer records *how* a run got there (restarts, the checkpoint path).
_VOLATILE = {"pytorch-lightning_version", "hparams_name"}


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k in _VOLATILE:
                continue
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in one")
            else:
                out += _diff(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [f"{path}: tensors differ"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for phase in ("first", "resume"):  # two separate processes: the resume starts from a clean interpreter
        proc = subprocess.run([sys.executable, "-m", "tests.reliability._resume_script", phase, str(out)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-5000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_resume_in_new_process_is_exact(sweep, name):
    straight = safe_load(sweep / name / "straight.ckpt")
    resumed = safe_load(sweep / name / "resumed.ckpt")
    assert straight["global_step"] > 0 and straight["epoch"] == resumed["epoch"]
    assert straight["optimizer_states"], "no optimizer state was checkpointed"
    differences = _diff(straight, resumed)
    assert not differences, "\n".join(differences[:20])
