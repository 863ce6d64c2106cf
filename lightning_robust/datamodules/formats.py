"""Readers of the real on-disk formats, each with structural checks and errors that name the file.

* CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``, ``batches.meta``): pickles, read with an
  unpickler that admits NumPy arrays only, so a tampered pickle cannot run code;
* MNIST IDX files, raw or ``.gz``: the header's dimensions must match the file length exactly;
* image lists (VisDA-2017 ``image_list.txt``, MNIST-M ``mnist_m_*_labels.txt``): ``<path> <label>`` lines;
* CelebA annotation files (``list_attr_celeba.txt``, ``list_eval_partition.txt``, ``identity_CelebA.txt``);
* single images, decoded with PIL inside a guard.

Every problem raises :class:`~lightning_robust.datamodules.integrity.DataIntegrityError` (or
:class:`~lightning_robust.datamodules.integrity.DatasetNotFoundError` for a missing file) naming the file,
and the line where there is one.
"""

from __future__ import annotations

import gzip
import importlib
import io
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from lightning_robust.datamodules.integrity import DataIntegrityError, DatasetNotFoundError

__all__ = [
    "load_cifar_batch",
    "load_cifar_meta",
    "open_image",
    "read_celeba_attributes",
    "read_celeba_column",
    "read_idx",
    "read_image_list",
]

_CORRUPT = "the file is corrupted or truncated - delete it and download it again"


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} does not exist")


# ---- CIFAR python pickles ---------------------------------------------------------------------------
def _numpy_attr(module: str, name: str) -> Any:
    # Pickles written under NumPy 1.x name `numpy.core.multiarray`; NumPy 2 moved it to `numpy._core`.
    for mod in (module.replace("numpy.core", "numpy._core"), module):
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"cannot resolve {module}.{name}")


class _PendingArray(np.ndarray):
    """What ``_reconstruct`` returns while unpickling: an empty array waiting for its data.

    NumPy pickles an array as ``_reconstruct(ndarray, shape, dtype)`` followed by ``__setstate__((version,
    shape, dtype, fortran, data))``. The real ``_reconstruct`` allocates ``shape`` at once, uninitialised:
    a pickle that skips ``__setstate__`` yields arrays of stale memory, and one with a huge shape allocates
    gigabytes from a few bytes. Here nothing is allocated until the data arrives, the data must hold exactly
    the declared number of bytes (never more than the file), and an array that never gets it is refused.
    """

    _limit: int = 0
    _built: bool = False

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError("malformed array state")
        shape, dtype, raw = state[-4], state[-3], state[-1]
        if not isinstance(dtype, np.dtype) or dtype.hasobject:
            raise pickle.UnpicklingError("array state without a plain (non-object) dtype")
        if isinstance(raw, str):  # Python 2 byte strings, decoded as latin1
            raw = raw.encode("latin1")
        if not isinstance(raw, (bytes, bytearray)):
            raise pickle.UnpicklingError(f"array data must be bytes, got {type(raw).__name__}")
        if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise pickle.UnpicklingError(f"malformed array shape {shape!r}")
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n  # Python integers: no overflow
        if nbytes != len(raw) or nbytes > self._limit:
            raise pickle.UnpicklingError(f"array of shape {shape} and dtype {dtype} needs {nbytes} bytes, but its "
                                         f"data holds {len(raw)} (the file has {self._limit})")
        super().__setstate__((*state[:-1], bytes(raw)))
        self._built = True


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and NumPy arrays; refuses every other global.

    A pickle can call any importable function on load; CIFAR batches only need NumPy's array
    reconstruction (plus ``_codecs.encode`` for bytes pickled by Python 3 at protocol 2). Arrays are
    reconstructed as :class:`_PendingArray` (no allocation before the data, which must fit the file).
    """

    _ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
    }
    _RECONSTRUCT: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    }

    def __init__(self, file: Any, limit: int, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.limit = limit
        self.arrays: list[_PendingArray] = []

    def _reconstruct(self, subtype: Any, shape: Any, dtype: Any) -> _PendingArray:
        if subtype is not np.ndarray:
            raise pickle.UnpicklingError(f"refusing to reconstruct {subtype!r} (only numpy.ndarray is expected)")
        arr = np.empty(0, dtype=np.uint8).view(_PendingArray)
        arr._limit = self.limit
        self.arrays.append(arr)
        return arr

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._RECONSTRUCT:
            return self._reconstruct
        if (module, name) in self._ALLOWED:
            return _numpy_attr(module, name)
        if (module, name) in (("__builtin__", "bytes"), ("builtins", "bytes")):
            # Protocol 2 writes an empty bytes object as a call of ``bytes()`` (zero-size arrays).
            return bytes
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only NumPy arrays are expected)")


def _plain(obj: Any) -> Any:
    """``obj`` with every :class:`_PendingArray` turned into a plain ``ndarray`` (dicts and lists walked)."""
    if isinstance(obj, _PendingArray):
        return obj.view(np.ndarray)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _unpickle(path: Path) -> dict[str, Any]:
    _require_file(path)
    try:
        with open(path, "rb") as f:
            unpickler = _ArrayOnlyUnpickler(f, limit=path.stat().st_size, encoding="latin1")
            obj = unpickler.load()
        if any(not a._built for a in unpickler.arrays):
            raise pickle.UnpicklingError("an array was reconstructed without its data (it would hold "
                                         "uninitialised memory)")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError, struct.error, UnicodeDecodeError, ImportError) as err:
        raise DataIntegrityError(f"{path}: cannot unpickle the CIFAR batch ({type(err).__name__}: {err}); "
                                 f"{_CORRUPT}") from err
    if not isinstance(obj, dict):
        raise DataIntegrityError(f"{path}: expected a pickled dict, got {type(obj).__name__}; {_CORRUPT}")
    # Python 2 pickles decoded as latin1 give str keys; Python 3 ones may keep bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: _plain(v) for k, v in obj.items()}


def load_cifar_batch(path: str | Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python batch: ``(images uint8 [N, 3, 32, 32], labels int64 [N])``.

    Raises:
        DataIntegrityError: on an unreadable pickle, missing keys, wrong shapes or labels out of range.
    """
    path = Path(path)
    d = _unpickle(path)
    key = "labels" if "labels" in d else "fine_labels"
    if "data" not in d or key not in d:
        raise DataIntegrityError(f"{path}: expected keys 'data' and 'labels', found {sorted(map(str, d))}; {_CORRUPT}")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataIntegrityError(f"{path}: 'data' must be a uint8 array of shape [N, 3072], got {desc}; {_CORRUPT}")
    try:
        labels = np.asarray(d[key], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DataIntegrityError(f"{path}: 'labels' is not a list of integers ({err}); {_CORRUPT}") from err
    if labels.shape != (data.shape[0],):
        raise DataIntegrityError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}; {_CORRUPT}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataIntegrityError(f"{path}: labels must lie in 0..{num_classes - 1}, found "
                                 f"{int(labels.min())}..{int(labels.max())}; {_CORRUPT}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar_meta(path: str | Path, num_classes: int = 10) -> list[str]:
    """The class names stored in ``batches.meta`` (``label_names``)."""
    path = Path(path)
    d = _unpickle(path)
    names = d.get("label_names")
    if not isinstance(names, list) or len(names) != num_classes:
        raise DataIntegrityError(f"{path}: expected 'label_names', a list of {num_classes} names; {_CORRUPT}")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


# ---- IDX (MNIST) ------------------------------------------------------------------------------------
_IDX_DTYPES: dict[int, str] = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_at_most(f: Any, n: int) -> bytes:
    """Up to ``n`` bytes of ``f``, in 1 MB reads: never allocates or decompresses more than asked."""
    chunks, remaining = [], n
    while remaining > 0:
        b = f.read(min(remaining, 1 << 20))
        if not b:
            break
        chunks.append(b)
        remaining -= len(b)
    return b"".join(chunks)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw) into an array of the declared type and shape.

    The header is ``0x00 0x00 <type> <ndim>`` followed by ``ndim`` big-endian uint32 sizes; the payload
    must hold exactly ``prod(sizes)`` items, so a truncated or padded file is reported, not reshaped. A
    ``.gz`` file is decompressed as a stream and never beyond the declared size plus one byte (a small gzip
    bomb cannot expand to gigabytes), and read to its end so that its CRC-32 is checked; dimensions whose
    product overflows are refused before anything is allocated.
    """
    path = Path(path)
    _require_file(path)
    gz = path.suffix == ".gz"
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or head[3] == 0:
                raise DataIntegrityError(f"{path}: not an IDX file (bad magic number {head.hex() or 'empty'}); "
                                         f"{_CORRUPT}")
            ndim, dtype = head[3], np.dtype(_IDX_DTYPES[head[2]])
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise DataIntegrityError(f"{path}: IDX header cut short ({4 + len(raw_dims)} bytes); {_CORRUPT}")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            shape = " x ".join(map(str, dims))
            expected = dtype.itemsize
            for n in dims:
                expected *= n  # Python integers: an overflow is seen, not wrapped
            if expected >= 2**62:
                raise DataIntegrityError(f"{path}: the IDX header declares {shape} items, {expected} bytes: the "
                                         f"dimensions overflow; {_CORRUPT}")
            if not gz and expected > path.stat().st_size - 4 - 4 * ndim:
                payload = b""  # shorter than declared: say so below without reading
                held = path.stat().st_size - 4 - 4 * ndim
            else:
                payload = _read_at_most(f, expected + 1)
                held = len(payload)
    except (OSError, EOFError, zlib.error) as err:
        # gzip raises BadGzipFile (an OSError) on a bad header or CRC, EOFError when cut short.
        raise DataIntegrityError(f"{path}: cannot decompress ({type(err).__name__}: {err}); {_CORRUPT}") from err
    if held != expected:
        holds = f"more than {expected}" if held > expected else str(held)
        raise DataIntegrityError(f"{path}: the IDX header declares {shape} items ({expected} bytes of data) but the "
                                 f"file holds {holds}; {_CORRUPT}")
    return np.frombuffer(payload, dtype=dtype).reshape(dims)


# ---- text annotation files --------------------------------------------------------------------------
def _lines(path: Path) -> list[str]:
    _require_file(path)
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataIntegrityError(f"{path}: not UTF-8 text ({err}); {_CORRUPT}") from err


def read_image_list(path: str | Path, num_classes: int) -> tuple[list[str], list[int]]:
    """Parse ``<relative image path> <label>`` lines (VisDA ``image_list.txt``, MNIST-M label files).

    Returns:
        ``(relative paths, labels)``; labels are checked to lie in ``0..num_classes-1``.
    """
    path = Path(path)
    names: list[str] = []
    labels: list[int] = []
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataIntegrityError(f"{path}, line {lineno}: expected '<image path> <label>', got {line[:80]!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise DataIntegrityError(f"{path}, line {lineno}: label {label} outside 0..{num_classes - 1}")
        names.append(parts[0])
        labels.append(label)
    if not names:
        raise DataIntegrityError(f"{path}: the image list is empty")
    return names, labels


def read_celeba_attributes(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """Parse ``list_attr_celeba.txt``: count line, 40 attribute names, then ``<file> <±1 x 40>`` rows.

    Returns:
        ``(attribute names, file names, attributes uint8 [N, 40] in {0, 1})``.
    """
    path = Path(path)
    lines = _lines(path)
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataIntegrityError(f"{path}, line 1: expected the number of images; {_CORRUPT}")
    n, names = int(lines[0]), lines[1].split()
    rows = [ln for ln in lines[2:] if ln.strip()]
    if len(rows) != n:
        raise DataIntegrityError(f"{path}: the header announces {n} images but {len(rows)} rows follow; {_CORRUPT}")
    files: list[str] = []
    attrs = np.empty((n, len(names)), dtype=np.uint8)
    for i, row in enumerate(rows):
        parts = row.split()
        if len(parts) != len(names) + 1 or any(v not in ("1", "-1") for v in parts[1:]):
            raise DataIntegrityError(f"{path}, line {i + 3}: expected a file name and {len(names)} values of "
                                     f"1 or -1, got {row[:80]!r}")
        files.append(parts[0])
        attrs[i] = [v == "1" for v in parts[1:]]
    return names, files, attrs


def read_celeba_column(path: str | Path, allowed: range | None = None) -> tuple[list[str], np.ndarray]:
    """Parse ``<file> <integer>`` rows (``list_eval_partition.txt``, ``identity_CelebA.txt``)."""
    path = Path(path)
    files: list[str] = []
    values: list[int] = []
    for lineno, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit() or (allowed is not None and int(parts[1]) not in allowed):
            what = f"an integer in {allowed.start}..{allowed.stop - 1}" if allowed is not None else "an integer"
            raise DataIntegrityError(f"{path}, line {lineno}: expected '<file> <{what}>', got {line[:80]!r}")
        files.append(parts[0])
        values.append(int(parts[1]))
    if not files:
        raise DataIntegrityError(f"{path}: the file is empty")
    return files, np.asarray(values, dtype=np.int64)


# ---- images -----------------------------------------------------------------------------------------
def open_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Decode an image fully and convert it to ``mode``; any decoder failure names the file.

    PIL decodes lazily: ``load()`` forces the whole image through the decoder here, so a truncated
    JPEG/PNG fails now, with the path, rather than later inside a transform.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise DatasetNotFoundError(f"{path}: image file is missing") from err
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert(mode)
    except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...)
        raise DataIntegrityError(f"{path}: cannot decode the image ({type(err).__name__}: {err}); "
                                 f"{_CORRUPT}") from err
