import io
import os
import pickle

import pytest
import torch

from lightning_robust.nets import MLP
from lightning_robust.utils import CheckpointError, load_module, safe_load


def test_roundtrip_plain_and_lightning_prefixed_state(tmp_path):
    src = MLP(64, 10, (16,))
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    torch.save({"state_dict": {f"student.{k}": v for k, v in src.state_dict().items()}, "epoch": 3},
               tmp_path / "lightning.ckpt")
    for name in ("plain.pt", "lightning.ckpt"):
        dst = load_module(tmp_path / name, into=MLP(64, 10, (16,)))
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v)


def test_module_passes_through_and_path_needs_architecture(tmp_path):
    net = MLP(64, 10)
    assert load_module(net) is net
    torch.save(net.state_dict(), tmp_path / "w.pt")
    with pytest.raises(ValueError, match="needs `into`"):
        load_module(tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_module(tmp_path / "missing.pt", into=net)
    with pytest.raises(CheckpointError, match="does not contain the weights of MLP"):
        load_module(tmp_path / "w.pt", into=MLP(64, 10, (8, 8, 8)))
    with pytest.raises(CheckpointError, match=r"(?s)do not fit MLP.*size mismatch for layers.1.weight"):
        load_module(tmp_path / "w.pt", into=MLP(32, 10))


class _Payload:
    """Unpickling this object would create a marker file: the payload of a booby-trapped pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_booby_trapped_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    pickle.dump({"state_dict": {"w": torch.zeros(1)}, "evil": _Payload(str(marker))}, buf)
    (tmp_path / "evil.ckpt").write_bytes(buf.getvalue())
    with pytest.raises(CheckpointError, match="is not a weights-only file"):
        safe_load(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_full_module_pickle_is_refused(tmp_path):
    torch.save(MLP(8, 2), tmp_path / "module.pt")  # a pickled nn.Module, not weights
    with pytest.raises(CheckpointError, match="not a weights-only file"):
        load_module(tmp_path / "module.pt", into=MLP(8, 2))


def test_garbage_and_truncated_files_are_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(MLP(8, 2).state_dict(), good)
    blobs = [os.urandom(64) for _ in range(20)] + [b"", good.read_bytes()[:100], good.read_bytes()[:-50]]
    for i, blob in enumerate(blobs):
        path = tmp_path / f"junk{i}.ckpt"
        path.write_bytes(blob)
        with pytest.raises(CheckpointError, match=f"junk{i}.ckpt"):
            safe_load(path)
