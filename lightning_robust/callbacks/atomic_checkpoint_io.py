"""Crash-safe checkpoint writing: a checkpoint file is either the complete old one or the complete new one.

Lightning writes a checkpoint through fsspec, which stages it in the system temporary folder and then
*moves* it into place. When that folder is on another file system (``/tmp`` on tmpfs, a job's scratch
disk) the move is a copy: a process killed during the copy leaves a truncated ``last.ckpt`` that
``ckpt_path="last"`` then picks up, and the staged file stays behind in ``/tmp``. Nothing is flushed to
disk either, so a power loss can leave an empty file after the rename.

:class:`AtomicCheckpointIO` writes the bytes to a hidden sibling file in the *same* folder
(``.<name>.partial-<pid>``), flushes and ``fsync``s it, then ``os.replace``s it over the target (atomic
on POSIX and Windows within one file system) and ``fsync``s the folder. A kill at any moment leaves the
previous checkpoint intact; the only leftover is the hidden partial file, which no checkpoint glob
(``*.ckpt``, ``last*.ckpt``) matches and which the next save into that folder removes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO"]

_PARTIAL_MARK = ".partial-"


def _partial_files(folder: Path, name: str) -> list[Path]:
    return list(folder.glob(f".{name}{_PARTIAL_MARK}*"))


def atomic_write_bytes(data: bytes, path: str | os.PathLike, chunk_size: int = 1 << 22) -> None:
    """Write ``data`` to ``path`` atomically: hidden sibling file, fsync, ``os.replace``, fsync the folder.

    Stale partial files of earlier killed writes of the same target are removed first.

    Args:
        data: the bytes to write.
        path: the final file path (its folder is created when missing).
        chunk_size: bytes per ``write`` call (the file is flushed and synced once, at the end).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in _partial_files(target.parent, target.name):
        # Left by a write that was killed: never a usable checkpoint, so remove it.
        stale.unlink(missing_ok=True)
    partial = target.parent / f".{target.name}{_PARTIAL_MARK}{os.getpid()}"
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

    Loading is Lightning's (``weights_only`` as the Trainer asks); remote URLs (``s3://`` ...) fall back to
    Lightning's own writer, since object stores already publish an object only once it is complete.

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
