"""The ``lightning-robust`` command: LightningCLI in subclass mode over every module of the package.

Examples::

    lightning-robust --version
    lightning-robust configs                       # the YAML files shipped with the package
    lightning-robust configs quickstart            # print one (``--copy DIR`` writes it into DIR)
    lightning-robust fit --config configs/quickstart.yaml
    lightning-robust fit --config configs/quickstart.yaml --trainer.fast_dev_run=true
    lightning-robust fit --config configs/quickstart.yaml --trainer.devices 2 --trainer.strategy ddp
    lightning-robust test --config configs/quickstart.yaml --ckpt_path runs/quickstart/.../last.ckpt

Any ``pl.LightningModule`` / ``pl.LightningDataModule`` subclass can be selected with ``class_path``;
the package's own are imported here so that their short names resolve too.

``predict`` writes the predictions to ``<default_root_dir>/predictions/`` through
:class:`~lightning_robust.callbacks.PredictionWriter` (``--reliability.prediction_writer false`` to skip).
"""

from __future__ import annotations

import argparse
import difflib
import pickle
import re
import shutil
import sys
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
from lightning_fabric.plugins import CheckpointIO
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

import lightning_robust.callbacks
import lightning_robust.datamodules
import lightning_robust.models  # noqa: F401  (registers subclasses for class_path resolution)
from lightning_robust import __version__
from lightning_robust.callbacks import AtomicCheckpointIO, FiniteLossGuard, PredictionWriter, RNGStateCheckpoint
from lightning_robust.utils.checkpoint import CheckpointError, is_url, verify_checkpoint_archive

__all__ = ["LightningRobustCLI", "RobustArgumentParser", "config_dir", "list_configs", "main"]

# Keys of the misspelling messages of jsonargparse / argparse, e.g. "unrecognized arguments: --trainer.max_epohcs 3",
# "Subcommand 'fit' does not accept option 'trainer.max_epohcs'", "Key 'trainer.max_epohcs' is not expected".
_BAD_KEY = re.compile(r"unrecognized arguments: --([\w.]+)|accept (?:nested )?(?:option|key) '([\w.]+)'|"
                      r"Key ['\"]([\w.]+)['\"] is not expected")


class RobustArgumentParser(LightningArgumentParser):
    """LightningArgumentParser whose errors lead with the fix: for an unknown key, the closest valid keys
    (:mod:`difflib`) come first, then the parser's message and a pointer to ``--help``, without the 40 lines
    of usage argparse prints first."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        lines = []
        match = _BAD_KEY.search(message)
        if match:
            bad = next(g for g in match.groups() if g)
            known = sorted({o.lstrip("-") for a in parser._actions for o in a.option_strings if o.startswith("--")})
            close = difflib.get_close_matches(bad, known, n=3, cutoff=0.6)
            if close:
                lines.append(f"error: unknown key {bad!r}; did you mean {' or '.join(repr(c) for c in close)}?")
        lines.append(f"error: {message}")
        prog = parser.prog.replace(" [options]", "")
        lines.append(f"(all options: {prog} --help)")
        sys.stderr.write("\n".join(lines) + "\n")
        sys.exit(2)


def config_dir() -> Path:
    """Folder of the YAML configs: ``lightning_robust/configs`` in an installed wheel, ``configs/`` in a checkout."""
    try:
        shipped = Path(str(resources.files("lightning_robust.configs")))
        if shipped.is_dir() and any(shipped.glob("*.yaml")):
            return shipped
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parents[1] / "configs"


def list_configs() -> list[str]:
    """Names (without ``.yaml``) of the shipped configs, sorted."""
    return sorted(p.stem for p in config_dir().glob("*.yaml"))


def _configs_command(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="lightning-robust configs",
                                     description="List the configs shipped with lightning_robust, print or copy one.")
    parser.add_argument("name", nargs="?", help="config to print (with or without .yaml)")
    parser.add_argument("--copy", metavar="DIR", help="copy the config into DIR instead of printing it")
    args = parser.parse_args(argv)
    names = list_configs()
    if args.name is None:
        print(f"configs in {config_dir()}:")
        print("\n".join(f"  {n}" for n in names))
        print("print one with `lightning-robust configs NAME`, copy it with `--copy DIR`; run it with "
              "`lightning-robust fit --config PATH`")
        return
    name = args.name.removesuffix(".yaml")
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        parser.error(f"no config named {name!r}{hint} (`lightning-robust configs` lists them)")
    src = config_dir() / f"{name}.yaml"
    if args.copy is None:
        sys.stdout.write(src.read_text())
        return
    dest = Path(args.copy)
    dest.mkdir(parents=True, exist_ok=True)
    print(shutil.copy(src, dest / src.name))


class LightningRobustCLI(LightningCLI):
    """LightningCLI with the package's defaults.

    * subclass mode for model and data (``class_path`` selects any LightningModule / DataModule);
    * the saved ``config.yaml`` may be overwritten, so a second run in the same directory works;
    * optimizers are constructor arguments of our modules; ``--optimizer`` / ``--lr_scheduler`` (as in
      LightningCLI) replace the module's ``configure_optimizers`` with one optimizer (and scheduler) when
      given, for modules with automatic optimization (GANs keep their own optimizers: a clear error);
    * reliability defaults, listed under ``reliability`` in ``--print_config`` and each switchable off
      (``--reliability.finite_loss_guard false``): checkpoints are written atomically
      (:class:`AtomicCheckpointIO`, unless the config names another CheckpointIO plugin), a
      :class:`FiniteLossGuard` stops training at the first NaN/inf loss, :class:`RNGStateCheckpoint` puts
      the random generators' states in checkpoints (each unless the config already has one), and
      ``predict`` writes its predictions (:class:`PredictionWriter`). With the plugin, ``--ckpt_path``
      (local or URL) is loaded weights-only whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says, after a
      CRC check;
    * a misspelt key answers with the closest valid keys first (:class:`RobustArgumentParser`).
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        kwargs.setdefault("parser_class", RobustArgumentParser)
        super().__init__(
            pl.LightningModule,
            pl.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=True,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--reliability.atomic_checkpoint_io", type=bool, default=True,
                            help="write checkpoints atomically and load them weights-only (AtomicCheckpointIO "
                                 "plugin), unless trainer.plugins has a CheckpointIO")
        parser.add_argument("--reliability.finite_loss_guard", type=bool, default=True,
                            help="stop at the first NaN/inf loss (FiniteLossGuard callback)")
        parser.add_argument("--reliability.rng_state_checkpoint", type=bool, default=True,
                            help="save the random generators' states in checkpoints (RNGStateCheckpoint callback)")
        parser.add_argument("--reliability.prediction_writer", type=bool, default=True,
                            help="predict: write predictions under <default_root_dir>/predictions (PredictionWriter)")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[pl.Callback]) -> pl.Trainer:
        switches = self._get(self.config, "reliability") or {}
        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if switches.get("atomic_checkpoint_io", True) and not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins or None
        given = list(config.get("callbacks") or []) + list(callbacks)
        for switch, default in (("finite_loss_guard", FiniteLossGuard), ("rng_state_checkpoint", RNGStateCheckpoint)):
            if switches.get(switch, True) and not any(isinstance(c, default) for c in given):
                callbacks = [*callbacks, default()]
        if (self.subcommand == "predict" and switches.get("prediction_writer", True)
                and not any(isinstance(c, BasePredictionWriter) for c in given)):
            root = config.get("default_root_dir") or "."
            callbacks = [*callbacks, PredictionWriter(Path(root) / "predictions")]
        return super()._instantiate_trainer(config, callbacks)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        """LightningCLI's ``--optimizer`` / ``--lr_scheduler``, refused for modules with manual optimization
        (GANs step several optimizers of their own; one replacement optimizer would silently break them)."""
        given = self._get(self.config_init, "optimizer")
        if given and not getattr(self.model, "automatic_optimization", True):
            self._parser(subcommand).error(
                f"--optimizer: {type(self.model).__name__} uses manual optimization with its own optimizers; set "
                "them through model.init_args (e.g. --model.init_args.lr) instead")
        super()._add_configure_optimizers_method_to_model(subcommand)

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
    """Entry point of the ``lightning-robust`` console script (returns nothing, so the exit code is 0).

    ``--version`` and ``configs`` are answered here; everything else goes to :class:`LightningRobustCLI`.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv:
        if argv[0] in ("--version", "-V"):
            print(f"lightning-robust {__version__}")
            return
        if argv[0] == "configs":
            _configs_command([str(a) for a in argv[1:]])
            return
    LightningRobustCLI(args=args)


if __name__ == "__main__":
    main()
