"""Corrupted checkpoints are detected: zip CRC-32 verification in ``safe_load`` and the plugin (issue 18).

``torch.save`` writes a zip archive whose members carry CRC-32s that ``torch.load`` never checks, so a
flipped bit inside a tensor's bytes loads as a silently changed tensor. The invariant tested here: after
any single bit flip, loading either raises ``CheckpointError`` naming the file or returns exactly the
saved content.
"""

from __future__ import annotations

import random
import struct
import zipfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_robust.callbacks import AtomicCheckpointIO
from lightning_robust.nets import MLP
from lightning_robust.utils import CheckpointError, load_module, safe_load

REPO = Path(__file__).resolve().parents[2]


def _saved(tmp_path: Path) -> tuple[Path, dict]:
    content = {"state_dict": {"w": torch.arange(64.0).reshape(8, 8), "b": torch.linspace(-1, 1, 7)},
               "epoch": 3, "name": "run"}
    path = tmp_path / "saved.ckpt"
    torch.save(content, path)
    return path, content


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _tensor_byte_ranges(path: Path) -> list[range]:
    """Byte ranges of the tensor storages (members ``archive/data/<k>``) inside the file."""
    raw = path.read_bytes()
    out = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if "/data/" not in info.filename:
                continue
            # Local header: 30 fixed bytes, then the name and the extra field (torch pads it for alignment).
            name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            out.append(range(start, start + info.file_size))
    return out


def _flip(path: Path, pos: int, bit: int, dest: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[pos] ^= 1 << bit
    dest.write_bytes(bytes(data))
    return dest


def test_control_torch_load_accepts_a_flipped_tensor_bit_silently(tmp_path):
    path, content = _saved(tmp_path)
    pos = _tensor_byte_ranges(path)[0][5]
    back = torch.load(_flip(path, pos, 3, tmp_path / "bad.ckpt"), weights_only=True)
    assert not _same(back, content)  # the hole: a changed tensor and no error


def test_every_flipped_tensor_byte_is_refused_naming_the_file(tmp_path):
    path, _ = _saved(tmp_path)
    rng = random.Random(0)
    positions = [p for r in _tensor_byte_ranges(path) for p in r]
    assert len(positions) == 4 * (64 + 7)
    for i, pos in enumerate(positions):
        bad = _flip(path, pos, rng.randrange(8), tmp_path / "flipped.ckpt")
        with pytest.raises(CheckpointError, match=r"flipped\.ckpt.*is corrupted.*saved/data/\d"):
            safe_load(bad)
        if i % 20 == 0:  # load_module (teachers, feature nets) reads through safe_load: a sample suffices
            with pytest.raises(CheckpointError, match=r"flipped\.ckpt"):
                load_module(bad, into=MLP(4, 2))


def test_a_bit_flip_anywhere_is_an_error_or_loads_the_exact_content(tmp_path):
    path, content = _saved(tmp_path)
    size = path.stat().st_size
    rng = random.Random(1)
    errors = 0
    for trial in range(400):
        bad = _flip(path, rng.randrange(size), rng.randrange(8), tmp_path / f"f{trial}.ckpt")
        try:
            back = safe_load(bad)
        except CheckpointError as err:
            message = str(err)
            errors += 1
        else:
            message = ""
            assert _same(back, content), trial
        assert not message or f"f{trial}.ckpt" in message
        bad.unlink()
    assert errors > 200  # most bytes are covered by a checksum or a header check


def test_a_buffer_is_verified_too(tmp_path):
    import io

    path, content = _saved(tmp_path)
    good = io.BytesIO(path.read_bytes())
    assert _same(safe_load(good), content)
    data = bytearray(path.read_bytes())
    data[_tensor_byte_ranges(path)[1][0]] ^= 1
    with pytest.raises(CheckpointError, match=r"<buffer>.*is corrupted"):
        safe_load(io.BytesIO(bytes(data)))


def test_checkpoint_without_crcs_warns_and_legacy_format_loads(tmp_path):
    _, content = _saved(tmp_path)
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(content, tmp_path / "nocrc.ckpt")
    finally:
        torch.serialization.set_crc32_options(True)
    with pytest.warns(UserWarning, match=r"nocrc\.ckpt.*without CRC-32"):
        assert _same(safe_load(tmp_path / "nocrc.ckpt"), content)
    torch.save(content, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    assert _same(safe_load(tmp_path / "legacy.ckpt"), content)


def _fit(tmp_path: Path, **fit_kw) -> pl.Trainer:
    from lightning_robust.models import Classifier

    data = DataLoader(TensorDataset(torch.rand(8, 16), torch.randint(0, 2, (8,))), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         plugins=[AtomicCheckpointIO()])
    trainer.fit(Classifier(MLP(16, 2, hidden=(4,))), data, **fit_kw)
    return trainer


def test_plugin_and_cli_refuse_a_corrupted_checkpoint(tmp_path):
    good = tmp_path / "good.ckpt"
    _fit(tmp_path).save_checkpoint(good)
    bad = _flip(good, _tensor_byte_ranges(good)[0][2], 6, tmp_path / "bitrot.ckpt")
    with pytest.raises(CheckpointError, match=r"bitrot\.ckpt.*is corrupted"):
        AtomicCheckpointIO().load_checkpoint(bad)
    with pytest.raises(CheckpointError, match=r"bitrot\.ckpt.*is corrupted"):
        _fit(tmp_path, ckpt_path=str(bad))

    from lightning_robust.cli import LightningRobustCLI
    from lightning_robust.nets import SmallCNN

    cnn = tmp_path / "cnn.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in SmallCNN(1, 10, input_size=8).state_dict().items()}}, cnn)
    bad_cnn = _flip(cnn, _tensor_byte_ranges(cnn)[0][0], 0, tmp_path / "cnn-bitrot.ckpt")
    with pytest.raises(CheckpointError, match=r"cnn-bitrot\.ckpt.*is corrupted"):
        LightningRobustCLI(args=["fit", "--config", str(REPO / "configs" / "quickstart.yaml"),
                                 f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1",
                                 "--trainer.enable_progress_bar=false", f"--ckpt_path={bad_cnn}"])


def test_missing_checkpoint_is_still_a_file_not_found_error(tmp_path):
    # Lightning's loader raised FileNotFoundError for a missing ckpt_path; code catching it keeps working.
    for load in (lambda p: AtomicCheckpointIO().load_checkpoint(p), safe_load):
        with pytest.raises(FileNotFoundError, match=r"nothere\.ckpt.*does not exist"):
            load(tmp_path / "nothere.ckpt")
        with pytest.raises(CheckpointError, match=r"nothere\.ckpt"):
            load(tmp_path / "nothere.ckpt")

