"""Helpers for 2-process CPU DDP tests.

* :func:`ddp_trainer` builds a ``ddp_spawn`` Trainer (works inside pytest; the test function's module
  must be importable, so define LightningModules at module level, not inside the test).
* :class:`RankGather` all-gathers values on every rank at the end of fit and asserts they agree; its
  rank-0 copy comes back to the test process through the callback's ``state`` file.
* :func:`run_ddp_script` runs a Python script with ``strategy="ddp"`` in a subprocess (``ddp`` re-runs
  the command line, so it cannot run inside pytest itself) and returns its JSON result.

Each extra process costs ~8 s of start-up: put several checks in one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy

__all__ = ["RankGather", "ddp_trainer", "flat_params", "run_ddp_script", "single_trainer"]

REPO = Path(__file__).resolve().parents[2]


def _common(tmp_path: Path, **kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    args.update(kwargs)
    return args


class _DestroyProcessGroup(pl.Callback):
    """Destroy the process group at the very end of the run (the last teardown hook, after ``on_fit_end``).

    Left to interpreter exit, gloo's threads can abort ("terminate called without an active exception",
    SIGABRT) and turn a finished run into a failed spawn. Nothing collective happens after this point (the
    launcher hands rank 0's results back through a queue and a file).
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def ddp_trainer(tmp_path: Path, find_unused_parameters: bool = False, **kwargs: Any) -> pl.Trainer:
    """A 2-process CPU ``ddp_spawn`` Trainer (gloo backend) with quiet defaults.

    ``find_unused_parameters=True`` is needed by modules whose backward passes leave some parameters
    without gradients (GANs' alternating updates under manual optimization).
    """
    strategy = DDPStrategy(start_method="spawn", find_unused_parameters=find_unused_parameters)
    kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), _DestroyProcessGroup()]
    return pl.Trainer(**_common(tmp_path, strategy=strategy, devices=2, num_nodes=1, **kwargs))


def single_trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    """The 1-process counterpart of :func:`ddp_trainer`, for comparisons."""
    return pl.Trainer(**_common(tmp_path, devices=1, **kwargs))


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    """All parameters and buffers of ``module`` as one flat float64 CPU vector."""
    parts = [t.detach().double().flatten().cpu() for t in module.state_dict().values() if t.is_floating_point()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


class RankGather(pl.Callback):
    """At the end of fit, gather ``fn(trainer, module)`` (a 1-D tensor) from every rank.

    Asserts that all ranks hold identical values (within ``atol``) and writes the ``[world, n]`` gathered
    tensor to ``path`` on rank 0, so the test process can read it after ``ddp_spawn`` returns.
    """

    def __init__(self, path: str | Path, fn: Callable[[pl.Trainer, pl.LightningModule], torch.Tensor] | None = None,
                 atol: float = 0.0) -> None:
        self.path, self.fn, self.atol = str(path), fn, atol

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        value = (self.fn or (lambda _t, m: flat_params(m)))(trainer, pl_module).double().flatten()
        gathered = trainer.strategy.all_gather(value.to(pl_module.device))
        gathered = gathered.reshape(trainer.world_size, -1).cpu()
        if trainer.global_rank == 0:
            torch.save(gathered, self.path)
        for r in range(1, gathered.shape[0]):
            assert torch.allclose(gathered[0], gathered[r], atol=self.atol, rtol=0), (
                f"rank {r} differs from rank 0 by {float((gathered[0] - gathered[r]).abs().max()):.3g}"
            )


def run_ddp_script(script: str, tmp_path: Path, timeout: float = 240.0) -> dict[str, Any]:
    """Run ``script`` (Python source) as ``python script.py`` in ``tmp_path``; return its JSON result.

    The script must write a JSON object to the path in ``os.environ["RESULT_PATH"]`` (on rank 0). It may
    use ``strategy="ddp"``, which launches the other rank by re-running the same command line.
    """
    path = tmp_path / "ddp_script.py"
    # Tear the process group down explicitly: leaving it to interpreter exit can abort gloo's threads
    # ("terminate called without an active exception") and turn a good run's exit code into a crash.
    footer = ("\nimport torch.distributed as _dist\n"
              "if _dist.is_available() and _dist.is_initialized():\n"
              "    _dist.barrier()\n    _dist.destroy_process_group()\n")
    path.write_text(script + footer)
    result = tmp_path / "result.json"
    pythonpath = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, RESULT_PATH=str(result), PYTHONPATH=pythonpath)
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0 or not result.is_file():
        raise AssertionError(f"DDP script failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(result.read_text())
