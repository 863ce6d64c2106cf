"""Integrity of on-disk data sets: clear errors, checksums, checksum manifests and safe extraction.

How files are verified (``verify=True``, the default of every vision DataModule):

1. **Checksums.** Before a file is read, its MD5 is compared with the expected one, looked up in this order:

   * a checksum *manifest* passed explicitly (``checksums="path/to/MD5SUMS"``): it replaces the official
     table, for copies that legitimately differ from the official release (a re-packed archive, a subset,
     the tiny files the tests write);
   * otherwise the *official* checksum of the file, for the data sets whose publishers' MD5s torchvision
     carries (CIFAR-10 batches and archive, MNIST IDX files ``.gz`` and uncompressed, CelebA annotation
     files and ``img_align_celeba.zip``); a local manifest can never vouch for a modified official file;
   * otherwise an ``MD5SUMS`` manifest found in the data set's folder (written by
     :func:`write_checksum_manifest` or by :func:`~lightning_robust.datamodules.build_mnist_m`), the only
     source for data sets without official checksums (VisDA-2017, MNIST-M).

   A file with no expected checksum from any source is not checksummed; a flipped pixel byte in such a
   file cannot be told from a real pixel, so write a manifest after downloading to close that gap.
2. **Structure**, always (also with ``verify=False``): readers check the IDX header against the file
   length, unpickle CIFAR batches with an unpickler that admits only NumPy arrays and check shapes and
   label ranges, parse annotation files line by line, check that every listed image exists, and decode
   images inside a guard. Truncation and most corruption are caught here even without checksums.

Every failure raises one :class:`DatasetNotFoundError` (nothing where the layout expects it) or
:class:`DataIntegrityError` (present but wrong) whose message names the file or the expected layout and
says what to do, never an exception from deep inside NumPy, pickle or PIL.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

from torchvision.datasets.utils import calculate_md5

__all__ = [
    "ChecksumTable",
    "DataIntegrityError",
    "DatasetNotFoundError",
    "extract_archive_once",
    "md5sum",
    "normalize_path",
    "read_checksum_manifest",
    "verify_checksums",
    "write_checksum_manifest",
]

MANIFEST_NAME = "MD5SUMS"
_MANIFEST_LINE = re.compile(r"^([0-9a-fA-F]{32}) [ *](.+)$")


class DatasetNotFoundError(FileNotFoundError):
    """A data set (or one of its files) is not where the documented layout expects it."""


class DataIntegrityError(RuntimeError):
    """A data file exists but is corrupted, truncated, of the wrong version or malformed."""


def normalize_path(path: str | Path) -> Path:
    """Absolute, normalised path without touching the disk (cheap for 200,000 image paths)."""
    return Path(os.path.abspath(path))


def md5sum(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex MD5 digest of a file: torchvision's ``calculate_md5`` (chunked, ``usedforsecurity=False``), the one
    MD5 helper of the data modules."""
    return calculate_md5(path, chunk_size)


def read_checksum_manifest(path: str | Path) -> dict[Path, str]:
    """Parse an ``md5sum``-format manifest into ``{absolute path: md5}``.

    Each line is ``<32 hex digits><space><space or *><relative path>``, as written by ``md5sum`` (and by
    :func:`write_checksum_manifest`); paths are relative to the manifest's folder; blank lines and lines
    starting with ``#`` are ignored.

    Raises:
        DatasetNotFoundError: if the manifest does not exist.
        DataIntegrityError: naming the line, if a line is malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"checksum manifest {path} does not exist")
    base = normalize_path(path).parent
    out: dict[Path, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as err:
        raise DataIntegrityError(f"checksum manifest {path} cannot be read as UTF-8 text ({err})") from err
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _MANIFEST_LINE.match(line.rstrip("\r\n"))
        if m is None:
            raise DataIntegrityError(f"checksum manifest {path}, line {lineno}: expected '<md5>  <relative path>', "
                                     f"got {line[:80]!r}")
        out[normalize_path(base / m.group(2))] = m.group(1).lower()
    return out


def write_checksum_manifest(folder: str | Path, files: Iterable[str | Path] | None = None,
                            name: str = MANIFEST_NAME) -> Path:
    """Write ``folder/name`` with the MD5 of ``files`` (default: every regular file below ``folder``).

    Run it once after downloading a data set without official checksums (VisDA-2017, MNIST-M) so that
    later corruption is detected; the DataModules pick up ``MD5SUMS`` in the data set's folder.

    Returns:
        The manifest's path.
    """
    folder = normalize_path(folder)
    target = folder / name
    if files is None:
        paths = sorted(p for p in folder.rglob("*") if p.is_file() and p != target)
    else:
        paths = [normalize_path(folder / p) for p in files]
    lines = [f"{md5sum(p)}  {p.relative_to(folder).as_posix()}" for p in paths]
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


class ChecksumTable:
    """Where the expected MD5 of each file comes from (see the module docstring for the order).

    Args:
        official: ``{absolute path: md5}`` of the publisher's checksums for this data set.
        manifest: an explicit manifest path; when given it replaces ``official`` and auto-detection.
        search_dirs: folders in which an ``MD5SUMS`` manifest is picked up automatically.
        enabled: ``False`` disables checksums altogether (structural checks still run).
    """

    def __init__(self, official: Mapping[Path, str] | None = None, manifest: str | Path | None = None,
                 search_dirs: Iterable[Path] = (), enabled: bool = True) -> None:
        self.enabled = enabled
        self.official = {normalize_path(p): m for p, m in (official or {}).items()}
        self.manifest_path = Path(manifest) if manifest is not None else None
        self._manifest: dict[Path, str] | None = None
        self._auto: dict[Path, tuple[str, str]] | None = None
        self._search_dirs = [Path(d) for d in search_dirs]

    def _auto_entries(self) -> dict[Path, tuple[str, str]]:
        if self._auto is None:
            self._auto = {}
            for d in self._search_dirs:
                m = d / MANIFEST_NAME
                if m.is_file():
                    for p, md5 in read_checksum_manifest(m).items():
                        self._auto.setdefault(p, (md5, f"listed in {m}"))
        return self._auto

    def _explicit(self) -> dict[Path, str]:
        if self._manifest is None:
            assert self.manifest_path is not None
            self._manifest = read_checksum_manifest(self.manifest_path)
        return self._manifest

    def is_empty(self) -> bool:
        """True when no file can have an expected checksum (nothing to verify)."""
        if not self.enabled:
            return True
        if self.manifest_path is not None:
            return not self._explicit()
        return not self.official and not self._auto_entries()

    def expected(self, path: str | Path) -> tuple[str, str] | None:
        """``(md5, where it comes from)`` for ``path``, or ``None`` if no source knows the file."""
        if not self.enabled:
            return None
        p = normalize_path(path)
        if self.manifest_path is not None:
            md5 = self._explicit().get(p)
            return (md5, f"listed in {self.manifest_path}") if md5 else None
        if p in self.official:
            return self.official[p], "official checksum of the published release"
        return self._auto_entries().get(p)


def verify_checksums(paths: Iterable[str | Path], table: ChecksumTable, hint: str = "") -> list[Path]:
    """Compare each file's MD5 with ``table``; return the files that were actually checked.

    Raises:
        DataIntegrityError: for the first mismatching file, naming it, both digests and its size.
    """
    checked: list[Path] = []
    for path in map(normalize_path, paths):
        exp = table.expected(path)
        if exp is None:
            continue
        md5, source = exp
        got = md5sum(path)
        if got != md5:
            size = path.stat().st_size
            raise DataIntegrityError(
                f"{path}: checksum mismatch (MD5 {got}, expected {md5}, {source}); the file ({size} bytes) "
                "is corrupted, truncated or not the expected version." + (f" {hint}" if hint else ""))
        checked.append(path)
    return checked


def _extract_zip(archive: Path, dest: Path) -> None:
    """Extract a zip member by member, refusing names that would land outside ``dest``.

    The counterpart of tar's ``filter="data"``: absolute names and ``..`` components are errors, not
    silently rewritten, so a tampered archive is reported rather than half-extracted somewhere else.
    """
    root = dest.resolve()
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            parts = Path(info.filename).parts
            target = (dest / info.filename).resolve()
            if Path(info.filename).is_absolute() or ".." in parts or not target.is_relative_to(root):
                raise ValueError(f"member {info.filename!r} would be extracted outside the destination")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError, ValueError)


def extract_archive_once(archive: str | Path, dest_parent: str | Path, top: str) -> Path:
    """Extract ``archive`` so that its top-level folder ``top`` appears in ``dest_parent``, atomically.

    Extraction goes to a private temporary folder beside the destination, which is then renamed into
    place: another process never sees a half-extracted folder, and if two processes race, the second
    rename fails harmlessly and the winner's copy is kept. Tar members are extracted with
    ``filter="data"`` (no absolute paths, links out of the tree or device files); zip members whose names
    would leave the destination are refused likewise.

    Returns:
        ``dest_parent / top``.

    Raises:
        DataIntegrityError: if the archive cannot be read or lacks ``top``.
    """
    archive, dest_parent = Path(archive), Path(dest_parent)
    final = dest_parent / top
    dest_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{top}.extract-", dir=dest_parent))
    try:
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, tmp)
            else:
                with tarfile.open(archive) as tf:
                    tf.extractall(tmp, filter="data")
        except _ARCHIVE_ERRORS as err:
            raise DataIntegrityError(f"{archive}: cannot extract the archive ({type(err).__name__}: {err}); it is "
                                     "corrupted, truncated or holds unsafe members - delete it and download it again"
                                     ) from err
        src = tmp / top
        if not src.is_dir():
            found = sorted(p.name for p in tmp.iterdir())[:5]
            raise DataIntegrityError(f"{archive}: expected a top-level folder '{top}/' in the archive, found {found}")
        try:
            os.replace(src, final)
        except OSError:
            if not final.is_dir():
                raise
            # Another process extracted the same archive first: keep its copy.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
