"""Safe checkpoint loading: weights-only unpickling, zip CRC verification, URLs fetched first, clear errors.

A pickle can run arbitrary code when loaded; ``weights_only=True`` restricts unpickling to tensors and
primitive containers. Every checkpoint read by this library goes through :func:`safe_load` (or
:func:`local_checkpoint`), which

* always passes ``weights_only=True`` explicitly, so neither ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (which
  only flips calls that leave ``weights_only`` unset) nor a caller's ``weights_only=False`` can turn the
  check off;
* fetches ``http(s)://`` (and other fsspec) URLs to a temporary file and loads that file the same way,
  where Lightning's own loader would unpickle a URL with ``weights_only=False``;
* verifies the CRC-32 of every member of the zip archive that ``torch.save`` writes before unpickling
  anything: ``torch.load`` itself does not, so a flipped bit in a tensor's bytes would load silently as a
  changed tensor. A checkpoint written with ``torch.serialization.set_crc32_options(False)`` has all-zero
  CRCs and cannot be checked (a warning says so); files in the legacy (non-zip) format carry no CRCs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import tempfile
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "WeightsOnlyLoadFromCheckpoint",
    "extract_state_dict",
    "load_module",
    "local_checkpoint",
    "safe_load",
    "verify_checkpoint_archive",
]

PathLike = str | os.PathLike
MapLocation = str | torch.device | Callable[..., Any] | Mapping[str, str] | None

# A URL scheme ("http://", "s3://", ...); "file://" is a local path. Windows drive letters ("C:\\") never match.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_ZIP_MAGIC = b"PK\x03\x04"
_FETCH_TIMEOUT_S = 60.0


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupted, not weights-only, or does not fit the target module."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A local checkpoint path that does not exist (also a ``FileNotFoundError``, as Lightning's loader raised)."""


def is_url(path: PathLike) -> bool:
    """True for a remote URL (``http(s)://``, ``s3://``, ...); ``file://`` and plain paths are local."""
    text = os.fspath(path)
    return isinstance(text, str) and bool(_URL.match(text)) and not text.startswith("file://")


def _fetch(url: str, dest: Path) -> None:
    """Copy the bytes at ``url`` into the local file ``dest`` (no unpickling happens here).

    ``http(s)`` goes through ``urllib`` (no extra dependency); any other scheme through fsspec, which
    Lightning already depends on (``s3://`` etc. need the matching fsspec backend installed).
    """
    with open(dest, "wb") as out:
        if url.lower().startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=_FETCH_TIMEOUT_S) as response:
                shutil.copyfileobj(response, out, length=1 << 20)
            return
        import fsspec

        with fsspec.open(url, "rb") as remote:
            shutil.copyfileobj(remote, out, length=1 << 20)


@contextlib.contextmanager
def local_checkpoint(path: PathLike) -> Iterator[Path]:
    """Yield a local, CRC-verified file holding the checkpoint at ``path`` (a local path or a URL).

    A URL is fetched into a temporary folder that is removed on exit. The file is verified with
    :func:`verify_checkpoint_archive` before it is yielded, so the caller only has to unpickle it
    weights-only.

    Raises:
        CheckpointError: a missing local file, a URL that cannot be fetched, or a corrupted archive;
            the message names ``path``.
    """
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    if is_url(text):
        with tempfile.TemporaryDirectory(prefix="lightning_robust-ckpt-") as tmp:
            local = Path(tmp) / "checkpoint"
            try:
                _fetch(text, local)
            except Exception as err:  # network, HTTP status, missing fsspec backend: all mean "not fetched"
                raise CheckpointError(
                    f"checkpoint {text!r} could not be fetched ({type(err).__name__}: {str(err)[:200]}); "
                    "download it yourself and pass the local path"
                ) from None
            verify_checkpoint_archive(local, name=text)
            yield local
        return
    local = Path(text.removeprefix("file://"))
    if not local.is_file():
        raise CheckpointNotFoundError(f"checkpoint file {text!r} does not exist")
    verify_checkpoint_archive(local, name=text)
    yield local


def verify_checkpoint_archive(source: PathLike | IO[bytes], name: str | None = None) -> None:
    """Check the CRC-32 of every member of a ``torch.save`` zip archive; a no-op for legacy (non-zip) files.

    ``torch.save`` writes a zip archive (stored, not compressed) whose members carry CRC-32 checksums,
    but ``torch.load`` never checks them: a flipped bit inside a tensor's bytes loads as a silently
    changed tensor. This reads every member once (the cost of one sequential read of the file) and
    compares. Headers are checked too: a member whose local header disagrees with the central directory,
    or an archive whose directory cannot be read, is refused.

    Args:
        source: a file path or a binary file object (its position is restored afterwards).
        name: how to name the file in errors (default: ``source``).

    Raises:
        CheckpointError: the archive is corrupted; the message names the file and the bad member.
    """
    label = name if name is not None else (os.fspath(source) if isinstance(source, (str, os.PathLike)) else "<buffer>")
    opened: IO[bytes]
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, os.PathLike)):
            opened = stack.enter_context(open(source, "rb"))
        else:
            opened = source
            start = opened.tell()
            stack.callback(opened.seek, start)
        head = opened.read(4)
        opened.seek(-len(head), os.SEEK_CUR)
        if head != _ZIP_MAGIC:
            return  # the legacy serialization format: no checksums to verify (torch.load checks its magic)
        member = "<directory>"
        try:
            with zipfile.ZipFile(opened) as archive:
                infos = archive.infolist()
                if infos and all(info.CRC == 0 for info in infos):
                    warnings.warn(
                        f"checkpoint {str(label)!r} was written without CRC-32 checksums "
                        "(torch.serialization.set_crc32_options(False)); corruption cannot be detected",
                        stacklevel=3,
                    )
                    return
                for info in infos:
                    member = info.filename
                    with archive.open(info) as fh:
                        # zipfile raises BadZipFile when the CRC of the bytes read differs from the stored one.
                        while fh.read(1 << 22):
                            pass
        except Exception as err:  # BadZipFile, EOFError, NotImplementedError (a flipped method field), ...
            raise CheckpointError(
                f"checkpoint {str(label)!r} is corrupted: its zip archive fails verification at member "
                f"{member!r} ({type(err).__name__}: {str(err)[:200]}); restore it from a good copy"
            ) from None


def safe_load(path: PathLike | IO[bytes], map_location: MapLocation = "cpu") -> Any:
    """Load a checkpoint weights-only, after verifying its archive's CRCs; URLs are fetched first.

    Args:
        path: a local path, a ``file://``/``http(s)://``/fsspec URL, or a binary file object.
        map_location: as for :func:`torch.load` (a device, a string, a callable or a mapping).

    Raises:
        CheckpointError: if the file is missing, cannot be fetched, is corrupted (a CRC mismatch), or holds
            objects other than tensors and primitives (a full pickled module, or a booby-trapped pickle:
            its payload never runs, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says).

    Example:
        >>> state = safe_load("runs/last.ckpt")["state_dict"]
    """
    if isinstance(path, (str, os.PathLike)):
        with local_checkpoint(path) as local:
            return _load_weights_only(local, os.fspath(path), map_location)
    verify_checkpoint_archive(path)
    return _load_weights_only(path, "<buffer>", map_location)


def _load_weights_only(source: Path | IO[bytes], name: str, map_location: MapLocation) -> Any:
    try:
        # weights_only=True explicitly: torch lets TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD override only an unset value.
        return torch.load(source, map_location=map_location, weights_only=True)  # type: ignore[arg-type]
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {name!r} is not a weights-only file (it holds pickled objects beyond tensors and "
            f"primitive containers, which lightning_robust refuses to unpickle): {str(err).splitlines()[0]}"
        ) from None
    except Exception as err:  # corrupt bytes surface as many exception types; all mean "unreadable"
        raise CheckpointError(
            f"checkpoint {name!r} could not be read ({type(err).__name__}: {str(err)[:200]})"
        ) from None


class WeightsOnlyLoadFromCheckpoint:
    """Mixin for a LightningModule / LightningDataModule: ``load_from_checkpoint`` is weights-only.

    Lightning's ``load_from_checkpoint`` calls ``torch.load`` with ``weights_only`` unset (so
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns unpickling of arbitrary objects back on) and loads
    ``http(s)://`` URLs with ``weights_only=False``. This override fetches URLs to a temporary file,
    verifies the archive's CRCs and hands Lightning the local file with ``weights_only=True``, so the
    environment cannot change it; ``weights_only=False`` is ignored with a warning. Every module and
    DataModule of this package inherits it; put it first in the bases of your own to get the same.

    Example:
        >>> class MyModule(WeightsOnlyLoadFromCheckpoint, pl.LightningModule): ...
        >>> model = Classifier.load_from_checkpoint("https://host/run/last.ckpt", net=SmallCNN())
    """

    @classmethod
    def load_from_checkpoint(
        cls,
        checkpoint_path: PathLike | IO[bytes],
        map_location: MapLocation = None,
        hparams_file: PathLike | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Lightning's ``load_from_checkpoint``, weights-only whatever the environment or ``weights_only`` say.

        Raises:
            CheckpointError: missing, unfetchable, corrupted or not weights-only (names the file).
        """
        if weights_only is False:
            warnings.warn(
                f"{cls.__name__}.load_from_checkpoint loads weights-only; weights_only=False is ignored",
                stacklevel=2,
            )
        parent = super().load_from_checkpoint  # type: ignore[misc]
        name = os.fspath(checkpoint_path) if isinstance(checkpoint_path, (str, os.PathLike)) else "<buffer>"
        with contextlib.ExitStack() as stack:
            source: Path | IO[bytes]
            if isinstance(checkpoint_path, (str, os.PathLike)):
                source = stack.enter_context(local_checkpoint(checkpoint_path))
            else:
                verify_checkpoint_archive(checkpoint_path)
                source = checkpoint_path
            try:
                if strict is not None:  # LightningDataModule.load_from_checkpoint has no `strict`
                    kwargs["strict"] = strict
                return parent(source, map_location=map_location, hparams_file=hparams_file, weights_only=True,
                              **kwargs)
            except pickle.UnpicklingError as err:
                raise CheckpointError(
                    f"checkpoint {str(name)!r} is not a weights-only file (it holds pickled objects beyond tensors "
                    f"and primitive containers, which lightning_robust refuses to unpickle): "
                    f"{str(err).splitlines()[0]}"
                ) from None


def extract_state_dict(obj: Any, template: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Return the module state dict inside ``obj`` (a plain state dict or a Lightning checkpoint).

    When ``template`` is given and the keys carry a prefix (a LightningModule stores its net as
    ``net.*``, ``student.*``, ...), the prefix under which the template's keys are found is stripped.
    """
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CheckpointError("the checkpoint holds no state dict (a mapping from names to tensors)")
    state = dict(obj)
    if template is None:
        return state
    wanted = set(template.state_dict())
    if wanted <= set(state):
        return {k: state[k] for k in wanted}
    # Find the prefix p with {p + k for k in wanted} inside the checkpoint's keys.
    some = next(iter(wanted)) if wanted else ""
    for key in state:
        if key.endswith(some):
            prefix = key[: len(key) - len(some)]
            if all(prefix + k in state for k in wanted):
                return {k: state[prefix + k] for k in wanted}
    missing = sorted(wanted - set(state))[:5]
    raise CheckpointError(
        f"the checkpoint does not contain the weights of {type(template).__name__} "
        f"(e.g. missing {missing}; checkpoint keys start with {sorted(state)[:3]})"
    )


def load_module(
    source: nn.Module | PathLike,
    into: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
    strict: bool = True,
) -> nn.Module:
    """Return a module: ``source`` itself, or ``into`` with weights loaded (weights-only) from ``source``.

    Args:
        source: an ``nn.Module`` (returned unchanged) or the path of a state dict / Lightning checkpoint.
        into: the architecture to load a path into; required when ``source`` is a path, since a
            weights-only file stores no code.
        map_location: device for the loaded tensors.
        strict: require shapes and names to match exactly.

    Raises:
        CheckpointError: path missing, not weights-only, or weights that do not fit ``into``.
        ValueError: a path without ``into``.

    Example:
        >>> teacher = load_module("teacher.ckpt", into=WideResNet(depth=34, widen_factor=10))
    """
    if isinstance(source, nn.Module):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be an nn.Module or a checkpoint path, got {type(source).__name__}")
    if into is None:
        raise ValueError(
            f"loading {str(source)!r} needs `into`, the architecture to load the weights into "
            "(weights-only checkpoints store no code)"
        )
    state = extract_state_dict(safe_load(source, map_location), template=into)
    try:
        into.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {str(source)!r} do not fit {type(into).__name__}: {err}") from None
    return into
