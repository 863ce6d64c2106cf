"""The ``lightning-robust`` command: LightningCLI in subclass mode over every module of the package.

Examples::

    lightning-robust fit --config configs/quickstart.yaml
    lightning-robust fit --config configs/quickstart.yaml --trainer.fast_dev_run=true
    lightning-robust fit --config configs/quickstart.yaml --trainer.devices 2 --trainer.strategy ddp
    lightning-robust test --config configs/quickstart.yaml --ckpt_path runs/quickstart/.../last.ckpt

Any ``pl.LightningModule`` / ``pl.LightningDataModule`` subclass can be selected with ``class_path``;
the package's own are imported here so that their short names resolve too.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins import CheckpointIO
from pytorch_lightning.cli import ArgsType, LightningCLI

import lightning_robust.callbacks
import lightning_robust.datamodules
import lightning_robust.models  # noqa: F401  (registers subclasses for class_path resolution)
from lightning_robust.callbacks import AtomicCheckpointIO, FiniteLossGuard, RNGStateCheckpoint
from lightning_robust.utils.checkpoint import CheckpointError, is_url, verify_checkpoint_archive

__all__ = ["LightningRobustCLI", "main"]


class LightningRobustCLI(LightningCLI):
    """LightningCLI with the package's defaults.

    * subclass mode for model and data (``class_path`` selects any LightningModule / DataModule);
    * the saved ``config.yaml`` may be overwritten, so a second run in the same directory works;
    * optimizers are constructor arguments of our modules (``auto_configure_optimizers=False``);
    * reliability defaults: checkpoints are written atomically (:class:`AtomicCheckpointIO`, unless the
      config names another CheckpointIO plugin) and a :class:`FiniteLossGuard` stops training at the first
      NaN/inf loss, and :class:`RNGStateCheckpoint` puts the random generators' states in checkpoints
      (each unless the config already has one). With the plugin, ``--ckpt_path`` (local or URL) is
      loaded weights-only whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says, after a CRC check.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[pl.Callback]) -> pl.Trainer:
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins
        given = list(config.get("callbacks") or []) + list(callbacks)
        for default in (FiniteLossGuard, RNGStateCheckpoint):
            if not any(isinstance(c, default) for c in given):
                callbacks = [*callbacks, default()]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        """Check a local ``--ckpt_path`` before LightningCLI peeks at its hyper-parameters.

        LightningCLI reads a local checkpoint's hyper-parameters with its own ``torch.load(weights_only=True)``
        before the Trainer loads it through the plugin: safe, but it skips the CRC check and lets a raw
        ``UnpicklingError`` escape. Verify the archive first and turn a refusal into ``CheckpointError``
        naming the file, as every other loading path does. (URLs are skipped by LightningCLI and loaded
        by :class:`AtomicCheckpointIO`.)
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or is_url(ckpt_path) or not Path(ckpt_path).is_file():
            super()._parse_ckpt_path()
            return
        verify_checkpoint_archive(ckpt_path)
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"checkpoint {str(ckpt_path)!r} is not a weights-only file (it holds pickled objects beyond "
                f"tensors and primitive containers, which lightning_robust refuses to unpickle): "
                f"{str(err).splitlines()[0]}"
            ) from None

    def instantiate_classes(self) -> None:
        """Instantiate, turning a constructor's validation error into one parser error (exit code 2).

        jsonargparse wraps constructor errors in a report over every type of a Union; the user needs only
        our message, which names the argument and the bad value.
        """
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            lines = [ln.strip()[2:] for ln in str(err).splitlines() if ln.strip().startswith("- ")]
            useful = [ln for ln in lines if not ln.startswith("Expected a <class 'NoneType'>")]
            self.parser.error("; ".join(useful) if useful else str(err))


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-robust`` console script (returns nothing, so the exit code is 0)."""
    LightningRobustCLI(args=args)


if __name__ == "__main__":
    main()
