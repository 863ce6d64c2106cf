"""Checksums, manifests, safe extraction and the structural readers (IDX, restricted unpickling, images)."""

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from lightning_robust.datamodules.formats import load_cifar_batch, open_image, read_idx, read_image_list
from lightning_robust.datamodules.integrity import (
    ChecksumTable,
    DataIntegrityError,
    DatasetNotFoundError,
    extract_archive_once,
    md5sum,
    read_checksum_manifest,
    verify_checksums,
    write_checksum_manifest,
)
from tests.helpers.vision_data import flip_byte, idx_bytes, truncate


def test_manifest_round_trip_matches_hashlib(tmp_path):
    (tmp_path / "sub").mkdir()
    files = {"a.bin": os.urandom(3000), "sub/b.txt": b"hello\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    manifest = write_checksum_manifest(tmp_path)
    # The format is md5sum's: `md5sum -c` would accept it.
    lines = manifest.read_text().splitlines()
    assert lines == [f"{hashlib.md5(files[n]).hexdigest()}  {n}" for n in sorted(files)]
    parsed = read_checksum_manifest(manifest)
    assert parsed == {(tmp_path / n).absolute(): hashlib.md5(d).hexdigest() for n, d in files.items()}
    assert md5sum(tmp_path / "a.bin") == hashlib.md5(files["a.bin"]).hexdigest()


def test_malformed_manifest_names_the_line(tmp_path):
    m = tmp_path / "MD5SUMS"
    m.write_text("# comment\n" + "0" * 32 + "  ok.bin\nnot a checksum line\n")
    with pytest.raises(DataIntegrityError, match=r"MD5SUMS, line 3: expected '<md5>  <relative path>'"):
        read_checksum_manifest(m)


def test_checksum_sources_and_precedence(tmp_path):
    f, g = tmp_path / "data_batch_1", tmp_path / "extra.bin"
    f.write_bytes(b"tiny")
    g.write_bytes(b"other")
    official = {f: "0" * 32}
    write_checksum_manifest(tmp_path, ["data_batch_1", "extra.bin"])  # auto-detected MD5SUMS
    table = ChecksumTable(official, None, [tmp_path])
    # An official checksum wins over a local manifest: a local file cannot vouch for a modified release.
    assert table.expected(f) == ("0" * 32, "official checksum of the published release")
    assert table.expected(g)[0] == md5sum(g)
    with pytest.raises(DataIntegrityError, match=r"data_batch_1: checksum mismatch .*official checksum"):
        verify_checksums([f, g], table)
    # An explicit manifest replaces the official table (for re-packed copies and test files).
    explicit = ChecksumTable(official, tmp_path / "MD5SUMS", [tmp_path])
    assert verify_checksums([f, g], explicit) == [f.absolute(), g.absolute()]
    # Disabled: nothing is checked.
    assert verify_checksums([f, g], ChecksumTable(official, enabled=False)) == []
    # A file no source knows is skipped (structure checks still apply when it is read).
    (tmp_path / "unknown.bin").write_bytes(b"x")
    assert verify_checksums([tmp_path / "unknown.bin"], table) == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_checksum_detects_flip_and_truncation(tmp_path, damage):
    f = tmp_path / "file.bin"
    f.write_bytes(os.urandom(10_000))
    table = ChecksumTable(manifest=write_checksum_manifest(tmp_path, ["file.bin"]))
    verify_checksums([f], table)
    (flip_byte if damage == "flip" else truncate)(f)
    with pytest.raises(DataIntegrityError, match=r"file\.bin: checksum mismatch \(MD5 [0-9a-f]{32}, expected"):
        verify_checksums([f], table)


def _tar_with(tmp_path, members, name="a.tar.gz"):
    path = tmp_path / name
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_extract_is_atomic_idempotent_and_safe(tmp_path):
    arc = _tar_with(tmp_path, {"top/a.txt": b"a", "top/sub/b.txt": b"b"})
    dest = tmp_path / "out"
    final = extract_archive_once(arc, dest, "top")
    assert (final / "sub" / "b.txt").read_bytes() == b"b"
    # A second extraction (a racing process) keeps the first copy and leaves no temporary folders.
    (final / "a.txt").write_bytes(b"kept")
    extract_archive_once(arc, dest, "top")
    assert (final / "a.txt").read_bytes() == b"kept"
    assert sorted(p.name for p in dest.iterdir()) == ["top"]
    # Members escaping the destination are refused by the "data" filter.
    evil = _tar_with(tmp_path, {"top/ok.txt": b"1", "../escape.txt": b"2"}, "evil.tar.gz")
    with pytest.raises(DataIntegrityError, match=r"evil.tar.gz: cannot extract the archive .*outside the destination"):
        extract_archive_once(evil, tmp_path / "evil", "top")
    assert not (tmp_path / "escape.txt").exists()
    with pytest.raises(DataIntegrityError, match="expected a top-level folder 'other/'"):
        extract_archive_once(arc, tmp_path / "x", "other")
    truncate(arc, 0.5)
    with pytest.raises(DataIntegrityError, match="cannot extract the archive"):
        extract_archive_once(arc, tmp_path / "y", "top")


def test_zip_extraction_is_checked(tmp_path):
    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("top/", "")
        zf.writestr("top/x/a.bin", b"payload")
    assert (extract_archive_once(good, tmp_path / "g", "top") / "x" / "a.bin").read_bytes() == b"payload"
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("top/a.bin", b"1")
        zf.writestr("top/../../escape.bin", b"2")
    with pytest.raises(DataIntegrityError, match=r"evil.zip: cannot extract .*outside the destination"):
        extract_archive_once(evil, tmp_path / "e", "top")
    assert not (tmp_path / "escape.bin").exists() and not (tmp_path / "e" / "top").exists()
    data = bytearray(good.read_bytes())
    data[data.index(b"payload")] ^= 0xFF  # the stored member no longer matches its CRC
    good.write_bytes(bytes(data))
    with pytest.raises(DataIntegrityError, match=r"good.zip: cannot extract the archive \(BadZipFile"):
        extract_archive_once(good, tmp_path / "h", "top")


def test_read_idx_matches_numpy_and_detects_damage(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    raw, gz = tmp_path / "img-idx3-ubyte", tmp_path / "img-idx3-ubyte.gz"
    raw.write_bytes(idx_bytes(x))
    gz.write_bytes(gzip.compress(idx_bytes(x)))
    assert np.array_equal(read_idx(raw), x) and np.array_equal(read_idx(gz), x)
    # Reference reader: torchvision's own IDX parser on the raw file.
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    assert np.array_equal(read_sn3_pascalvincent_tensor(str(raw)).numpy(), x)
    truncate(raw, 0.9)
    with pytest.raises(DataIntegrityError, match=r"img-idx3-ubyte: the IDX header declares 7 x 28 x 28 items"):
        read_idx(raw)
    flip_byte(gz, len(gz.read_bytes()) - 6)  # inside the gzip trailer's CRC
    with pytest.raises(DataIntegrityError, match=r"img-idx3-ubyte.gz: cannot decompress"):
        read_idx(gz)
    gz.write_bytes(gzip.compress(idx_bytes(x))[:500])
    with pytest.raises(DataIntegrityError, match=r"img-idx3-ubyte.gz: cannot decompress"):
        read_idx(gz)
    raw.write_bytes(b"\x01\x02\x03\x04" + idx_bytes(x)[4:])
    with pytest.raises(DataIntegrityError, match="not an IDX file"):
        read_idx(raw)
    with pytest.raises(DatasetNotFoundError, match="nothere does not exist"):
        read_idx(tmp_path / "nothere")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_cifar_unpickler_refuses_code(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Evil(target), "labels": [0]}, protocol=2))
    with pytest.raises(DataIntegrityError, match=r"data_batch_1: cannot unpickle .*refusing to load"):
        load_cifar_batch(path)
    assert not target.exists()


def test_cifar_batch_structure_errors(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": np.zeros((3, 100), np.uint8), "labels": [0, 1, 2]}, protocol=2))
    with pytest.raises(DataIntegrityError, match=r"'data' must be a uint8 array of shape \[N, 3072\]"):
        load_cifar_batch(path)
    path.write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 11]}, protocol=2))
    with pytest.raises(DataIntegrityError, match=r"labels must lie in 0..9, found 0..11"):
        load_cifar_batch(path)
    path.write_bytes(pickle.dumps([1, 2], protocol=2))
    with pytest.raises(DataIntegrityError, match="expected a pickled dict"):
        load_cifar_batch(path)


def test_open_image_guards_decoder(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    for ext in ("png", "jpg"):
        p = tmp_path / f"im.{ext}"
        Image.fromarray(arr).save(p)
        with Image.open(p) as ref:
            assert np.array_equal(np.asarray(open_image(p, "RGB")), np.asarray(ref.convert("RGB")))
            assert np.array_equal(np.asarray(open_image(p, "L")), np.asarray(ref.convert("L")))
        truncate(p, 0.5)
        with pytest.raises(DataIntegrityError, match=rf"im\.{ext}: cannot decode the image"):
            open_image(p)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataIntegrityError, match=r"empty\.png: cannot decode the image"):
        open_image(tmp_path / "empty.png")
    with pytest.raises(DatasetNotFoundError, match=r"gone\.png: image file is missing"):
        open_image(tmp_path / "gone.png")


def test_image_list_errors_name_the_line(tmp_path):
    p = tmp_path / "image_list.txt"
    p.write_text("car/a.png 3\nbus/b.png\n")
    with pytest.raises(DataIntegrityError, match=r"image_list.txt, line 2: expected '<image path> <label>'"):
        read_image_list(p, 12)
    p.write_text("car/a.png 3\nbus/b.png 12\n")
    with pytest.raises(DataIntegrityError, match=r"line 2: label 12 outside 0..11"):
        read_image_list(p, 12)
    p.write_text("")
    with pytest.raises(DataIntegrityError, match="the image list is empty"):
        read_image_list(p, 12)
    p.write_text("dir with space/a b.png 4\n")
    assert read_image_list(p, 12) == (["dir with space/a b.png"], [4])


class _DatalessArray:
    """Pickles as NumPy's ``_reconstruct(ndarray, shape, uint8)`` with no ``__setstate__`` data after it."""

    def __init__(self, shape):
        self.shape = shape

    def __reduce__(self):
        return (np.ndarray.__reduce__(np.zeros(0, np.uint8))[0], (np.ndarray, self.shape, np.dtype(np.uint8)))


@pytest.mark.parametrize("n_images", [200, 20_000])
def test_cifar_arrays_without_their_data_are_refused(tmp_path, n_images):
    # Issue 18: a 616-byte data_batch_1 loaded as 200 images of uninitialised memory (and a larger declared
    # shape allocated as much as it liked). Arrays must come with exactly their bytes, never more than the file.
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _DatalessArray((n_images, 3072)), "labels": [0] * n_images}, protocol=2))
    assert path.stat().st_size < n_images * 3072
    with pytest.raises(DataIntegrityError, match=r"data_batch_1: cannot unpickle .*without its data"):
        load_cifar_batch(path)


def test_cifar_array_state_must_match_its_shape(tmp_path):
    # A state whose shape declares more bytes than its data holds is refused, and real batches round-trip.
    path = tmp_path / "data_batch_1"
    x = np.random.default_rng(0).integers(0, 256, size=(4, 3072), dtype=np.uint8)
    for protocol in (2, 4):
        path.write_bytes(pickle.dumps({"data": x, "labels": [1, 2, 3, 4]}, protocol=protocol))
        data, labels = load_cifar_batch(path)
        assert type(data) is np.ndarray and np.array_equal(data.reshape(4, -1), x) and labels.tolist() == [1, 2, 3, 4]
    blob = pickle.dumps({"data": x, "labels": [1, 2, 3, 4]}, protocol=2)
    # The shape tuple (4, 3072) is pickled as two BININT/BININT2 opcodes; make it (40, 3072).
    patched = blob.replace(b"K\x04M\x00\x0c", b"K(M\x00\x0c", 1)
    assert patched != blob
    path.write_bytes(patched)
    with pytest.raises(DataIntegrityError, match=r"data_batch_1: cannot unpickle"):
        load_cifar_batch(path)


def test_idx_gzip_bomb_is_not_decompressed_beyond_the_declared_size(tmp_path):
    # Issue 18: a 1 MB gzip bomb became 1 GB in memory. The header declares 2 x 2 bytes; 64 MB of zeros
    # follow. Decompression stops one byte past the declared payload.
    import tracemalloc

    header = bytes([0, 0, 0x08, 2]) + (2).to_bytes(4, "big") * 2
    bomb = tmp_path / "bomb-idx2-ubyte.gz"
    bomb.write_bytes(gzip.compress(header + bytes(4) + bytes(64 * 2**20)))
    assert bomb.stat().st_size < 2**20
    tracemalloc.start()
    try:
        with pytest.raises(DataIntegrityError, match=r"bomb-idx2-ubyte.gz: the IDX header declares 2 x 2 items "
                                                     r"\(4 bytes of data\) but the file holds more than 4"):
            read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # far below the 64 MB the bomb expands to


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dimensions_that_overflow_are_named(tmp_path, gz):
    # 2^31 x 2^31 x 4 one-byte items: the int64 product wraps to 0, which an empty payload "matched".
    header = bytes([0, 0, 0x08, 3]) + (2**31).to_bytes(4, "big") * 2 + (4).to_bytes(4, "big")
    path = tmp_path / ("over-idx3-ubyte" + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(header) if gz else header)
    with pytest.raises(DataIntegrityError, match=r"over-idx3-ubyte(\.gz)?: the IDX header declares "
                                                 r"2147483648 x 2147483648 x 4 items.*overflow"):
        read_idx(path)
