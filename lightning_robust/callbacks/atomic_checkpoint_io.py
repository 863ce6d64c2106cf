"""Crash-safe checkpoint writing: a checkpoint file is either the complete old one or the complete new one.

Lightning writes a checkpoint through fsspec, which stages it in the system temporary folder and then
*moves* it into place. When that folder is on another file system (``/tmp`` on tmpfs, a job's scratch
disk) the move is a copy: a process killed during the copy leaves a truncated ``last.ckpt`` that
``ckpt_path="last"`` then picks up, and the staged file stays behind in ``/tmp``. Nothing is flushed to
disk either, so a power loss can leave an empty file after the rename.

:class:`AtomicCheckpointIO` writes the bytes to a hidden sibling file in the *same* folder
(``.<name>.partial-<host>-<pid>-<random>``), flushes and ``fsync``s it, then ``os.replace``s it over the
target (atomic on POSIX and Windows within one file system) and ``fsync``s the folder. A kill at any
moment leaves the previous checkpoint intact; the only leftover is the hidden partial file, which no
checkpoint glob (``*.ckpt``, ``last*.ckpt``) matches and which a later save of the same target on the
same host removes once its writer is dead. The partial name is unique per write, and a partial whose
writer is still alive is never removed, so two processes saving the same path at once do not delete
each other's partial files: the last ``os.replace`` wins and both saves succeed.

Loading never unpickles arbitrary objects: :meth:`AtomicCheckpointIO.load_checkpoint` goes through
:func:`lightning_robust.utils.safe_load` (weights-only whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` or the
Trainer's ``weights_only`` says, URLs fetched to a temporary file first, zip CRCs verified).
"""

from __future__ import annotations

import io
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_robust.utils.checkpoint import CheckpointError, safe_load

__all__ = ["AtomicCheckpointIO"]

_PARTIAL_MARK = ".partial-"
# A partial file of another host is removed only when this old: no single checkpoint write takes a day.
_FOREIGN_PARTIAL_MAX_AGE_S = 24 * 3600.0


def _partial_files(folder: Path, name: str) -> list[Path]:
    return list(folder.glob(f".{name}{_PARTIAL_MARK}*"))


def _host_tag() -> str:
    # Only characters that are safe in a file name; '-' separates the fields, so it is replaced too.
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _partial_name(target: Path) -> Path:
    return target.parent / f".{target.name}{_PARTIAL_MARK}{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence check only (POSIX)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but owned by someone else, or cannot tell: keep its file
    return True


def _is_stale(partial: Path, name: str) -> bool:
    """Whether ``partial`` was left by a writer that is gone (killed mid-write), so it may be removed.

    Names are ``.<name>.partial-<host>-<pid>-<token>`` (or the older ``.<name>.partial-<pid>``). A partial
    of this host is stale when its pid is not running; one of another host (a shared file system) when
    it is older than a day. On Windows ``os.kill(pid, 0)`` would terminate the process, so only the
    age rule applies there.
    """
    tail = partial.name[len(f".{name}{_PARTIAL_MARK}") :]
    fields = tail.rsplit("-", 2)
    host, pid_text = (_host_tag(), fields[0]) if len(fields) == 1 else (fields[0], fields[1])
    if host == _host_tag() and pid_text.isdigit() and os.name != "nt":
        return not _pid_alive(int(pid_text))
    try:
        return time.time() - partial.stat().st_mtime > _FOREIGN_PARTIAL_MAX_AGE_S
    except FileNotFoundError:
        return False  # its writer just renamed it into place


def atomic_write_bytes(data: bytes, path: str | os.PathLike, chunk_size: int = 1 << 22) -> None:
    """Write ``data`` to ``path`` atomically: hidden sibling file, fsync, ``os.replace``, fsync the folder.

    Stale partial files of earlier killed writes of the same target are removed first; partial files of
    writers that are still running (another process saving the same path) are left alone.

    Args:
        data: the bytes to write.
        path: the final file path (its folder is created when missing).
        chunk_size: bytes per ``write`` call (the file is flushed and synced once, at the end).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for other in _partial_files(target.parent, target.name):
        if _is_stale(other, target.name):
            # Left by a write that was killed: never a usable checkpoint, so remove it.
            other.unlink(missing_ok=True)
    # Unique per write: a concurrent writer (another process, or another thread of this one) never shares it.
    partial = _partial_name(target)
    try:
        with open(partial, "wb") as fh:
            view = memoryview(data)
            for start in range(0, len(view), chunk_size):
                fh.write(view[start : start + chunk_size])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(partial, target)
    except BaseException:
        # An exception (not a kill) must not leave the partial file behind either.
        partial.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):
        # Make the rename itself durable (POSIX); not available on Windows, where replace is enough.
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """A ``CheckpointIO`` plugin whose saves are atomic and durable on local file systems.

    Saving: remote URLs (``s3://`` ...) fall back to Lightning's own writer, since object stores already
    publish an object only once it is complete.

    Loading (``Trainer.fit/validate/test/predict(ckpt_path=...)``) is always weights-only, through
    :func:`~lightning_robust.utils.safe_load`: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` and
    ``weights_only=False`` are ignored (the latter with a warning), an ``http(s)://`` or fsspec URL is
    fetched to a temporary file first (Lightning's own loader would unpickle it with
    ``weights_only=False``), and the zip archive's CRC-32s are verified, so a corrupted file raises
    :class:`~lightning_robust.utils.CheckpointError` naming it instead of loading changed tensors.

    Example:
        >>> trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])

    The ``lightning-robust`` CLI installs it by default.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options are not supported by {type(self).__name__}, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(buffer.getvalue(), str(path).removeprefix("file://"))

    def load_checkpoint(
        self,
        path: Any,
        map_location: Callable[..., Any] | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Load ``path`` (local path or URL) weights-only, after verifying its archive's CRCs.

        Raises:
            CheckpointError: missing, unfetchable, corrupted or not weights-only (names the file).
        """
        if weights_only is False:
            warnings.warn(
                f"{type(self).__name__} loads checkpoints weights-only; weights_only=False is ignored. To "
                "unpickle a checkpoint you trust completely, use Lightning's TorchCheckpointIO plugin instead",
                stacklevel=2,
            )
        checkpoint = safe_load(path, map_location=map_location)
        if not isinstance(checkpoint, dict):
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds a {type(checkpoint).__name__}, not a Lightning checkpoint (a dict)"
            )
        return checkpoint
