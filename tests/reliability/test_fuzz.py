# ruff: noqa: PT017  (hypothesis bodies accept either a clear error or a valid result, so they inspect both)
"""Property-based fuzzing (hypothesis): attacks, file parsers and certificates either give a clear error
naming the bad argument or file, or a valid result — never another crash, never a silent NaN."""

from __future__ import annotations

import io
import pickle
import re
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_robust.attacks import FGSM, PGD
from lightning_robust.certify import decision_boundary_certificate, simplex_certificate
from lightning_robust.datamodules.formats import load_cifar_batch, read_idx
from lightning_robust.datamodules.integrity import DataIntegrityError, DatasetNotFoundError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class AnyShapeNet(nn.Module):
    """Logits from per-sample statistics, so that any input shape [B, ...] is accepted."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        stats = torch.stack([flat.mean(1), flat.pow(2).mean(1), flat.amax(1)], 1)
        return self.head(stats)


@st.composite
def valid_attack_inputs(draw):
    """Inputs every attack must accept: float32/float64 images in [0, 1] (bounds included), [B, ...] with at
    least one feature dimension, integer labels in range, one per sample (B = 0 included)."""
    batch = draw(st.integers(0, 3))
    dims = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.rand(batch, *dims, generator=g, dtype=torch.float64)
    if x.numel() and draw(st.booleans()):  # pixels exactly on the box's faces
        x.view(-1)[0] = draw(st.sampled_from([0.0, 1.0]))
    label_dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.uint8]))
    y = torch.randint(0, 4, (batch,), generator=g).to(label_dtype)
    return x.to(dtype), y


# One defect per invalid case, with the argument its error must name.
_INVALID = {
    "nan": "x", "inf": "x", "below_box": "x", "above_box": "x", "integer_x": "x", "half_x": "x", "no_feature_dim": "x",
    "float_y": "y", "y_too_long": "y", "negative_y": "y", "y_out_of_range": "y",
}


@st.composite
def invalid_attack_inputs(draw):
    x, y = draw(valid_attack_inputs().filter(lambda xy: xy[0].shape[0] > 0))
    defect = draw(st.sampled_from(sorted(_INVALID)))
    x = x.clone()
    i = draw(st.integers(0, x.numel() - 1))
    if defect in ("nan", "inf"):
        x.view(-1)[i] = float(defect)
    elif defect == "below_box":
        x.view(-1)[i] = -draw(st.floats(1e-3, 10.0))
    elif defect == "above_box":
        x.view(-1)[i] = 1 + draw(st.floats(1e-3, 10.0))
    elif defect == "integer_x":
        x = (x * 255).round().to(draw(st.sampled_from([torch.uint8, torch.int64])))
    elif defect == "half_x":
        x = x.to(draw(st.sampled_from([torch.float16, torch.bfloat16])))
    elif defect == "no_feature_dim":
        x = x.flatten()[: x.shape[0]]
    elif defect == "float_y":
        y = y.float()
    elif defect == "y_too_long":
        y = torch.cat([y, y[:1]])
    elif defect == "negative_y":
        y = y.long().clone()
        y[draw(st.integers(0, len(y) - 1))] = -1
    elif defect == "y_out_of_range":
        y = y.long().clone()
        y[draw(st.integers(0, len(y) - 1))] = draw(st.integers(4, 9))
    return x, y, defect


_ATTACKS = [
    PGD(eps=0.1, alpha=0.05, steps=3, norm="linf"),
    PGD(eps=0.5, alpha=0.2, steps=3, norm="l2"),
    FGSM(eps=0.1, random_start=True),
]
_ATTACK_IDS = ["pgd-linf", "pgd-l2", "fgsm-rs"]


@pytest.mark.parametrize("attack", _ATTACKS, ids=_ATTACK_IDS)
def test_attacks_succeed_on_every_valid_input(attack):
    models = {torch.float32: AnyShapeNet(), torch.float64: AnyShapeNet().double()}

    @FUZZ
    @given(valid_attack_inputs())
    def check(xy):
        x, y = xy
        out = attack(models[x.dtype], x, y, generator=torch.Generator().manual_seed(0))  # no error allowed
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all(), "attack produced NaN/inf from valid inputs"
        assert attack.threat.contains(out.double(), x.double(), tol=1e-6).all()
        assert ((out >= 0) & (out <= 1)).all()

    check()


@pytest.mark.parametrize("attack", _ATTACKS, ids=_ATTACK_IDS)
def test_attacks_reject_each_invalid_input_naming_the_argument(attack):
    models = {torch.float32: AnyShapeNet(), torch.float64: AnyShapeNet().double()}

    @FUZZ
    @given(invalid_attack_inputs())
    def check(case):
        x, y, defect = case
        # The model matches x's dtype except for half-precision x (the defect there is the dtype mismatch).
        model = models.get(x.dtype, models[torch.float32])
        with pytest.raises((ValueError, TypeError)) as info:
            attack(model, x, y, generator=torch.Generator().manual_seed(0))
        named = re.findall(r"\b(x|y)\b", str(info.value))
        assert _INVALID[defect] in named, f"{defect}: error does not name {_INVALID[defect]!r}: {info.value}"

    check()


# ----------------------------------------------------------------------------------------- file parsers

def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[arr.dtype.type]
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(
        arr.dtype.newbyteorder(">")).tobytes()


@st.composite
def mutated_idx(draw):
    shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    arr = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    raw = bytearray(_idx_bytes(arr))
    op = draw(st.sampled_from(["flip", "truncate", "extend", "random"]))
    if op == "flip":
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] ^= draw(st.integers(1, 255))
    elif op == "truncate":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    elif op == "extend":
        raw += bytes(draw(st.integers(1, 9)))
    elif op == "random":
        raw = bytearray(draw(st.binary(max_size=64)))
    return bytes(raw), arr, op


@st.composite
def valid_idx(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    dtype = draw(st.sampled_from([np.uint8, np.int32, np.float32]))
    seed = draw(st.integers(0, 2**16))
    arr = np.random.default_rng(seed).integers(-1000, 1000, size=shape)
    arr = (arr % 256).astype(dtype) if dtype is np.uint8 else arr.astype(dtype) / (4 if dtype is np.float32 else 1)
    return arr.astype(dtype)


@FUZZ
@given(valid_idx(), st.booleans())
def test_idx_parser_reads_every_valid_file_exactly(tmp_path_factory, arr, gz):
    import gzip

    raw = _idx_bytes(arr)
    path = tmp_path_factory.mktemp("idx") / ("f.idx.gz" if gz else "f.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = read_idx(path)  # no error allowed
    assert out.shape == arr.shape and np.array_equal(out, arr)


@FUZZ
@given(mutated_idx(), st.booleans())
def test_idx_parser_on_mutated_files(tmp_path_factory, case, gz):
    import gzip

    raw, _, _ = case
    path = tmp_path_factory.mktemp("idx") / ("f.idx.gz" if gz else "f.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    try:
        out = read_idx(path)
    except DataIntegrityError as err:
        assert str(path) in str(err)
        return
    # Accepted: the payload is exactly what the (possibly mutated) header declares.
    header = 4 + 4 * raw[3]
    assert out.size * out.dtype.itemsize == len(raw) - header


@FUZZ
@given(st.sampled_from(["ok", "keys", "dtype", "shape", "labels", "range", "bytes", "object"]),
       st.integers(0, 4))
def test_cifar_batch_parser_on_malformed_pickles(tmp_path_factory, kind, n):
    data = np.zeros((n, 3072), dtype=np.uint8)
    labels: object = list(range(n))
    d: dict = {"data": data, "labels": labels}
    if kind == "keys":
        d = {"images": data}
    elif kind == "dtype":
        d["data"] = data.astype(np.float32)
    elif kind == "shape":
        d["data"] = np.zeros((n, 3071), dtype=np.uint8)
    elif kind == "labels":
        d["labels"] = ["cat"] * n
    elif kind == "range":
        d["labels"] = [10] * n
    elif kind == "object":
        d["evil"] = io.BytesIO(b"x")  # a class outside numpy/builtins: must be refused, not unpickled
    path = tmp_path_factory.mktemp("cifar") / "data_batch_1"
    blob = pickle.dumps(d, protocol=2)
    path.write_bytes(blob[: len(blob) // 2] if kind == "bytes" else blob)
    if kind == "ok" or (n == 0 and kind in ("labels", "range")):
        images, labs = load_cifar_batch(path)
        assert images.shape == (n, 3, 32, 32) and labs.tolist() == list(range(n))[: len(labs)]
        return
    with pytest.raises(DataIntegrityError, match=re.escape(str(path))):
        load_cifar_batch(path)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises((DatasetNotFoundError, DataIntegrityError, FileNotFoundError), match="nothere"):
        read_idx(tmp_path / "nothere.idx")


# ----------------------------------------------------------------------------------------- certificates

def _relu_net(draw) -> nn.Module:
    """A random one-hidden-layer ReLU net on 3 features (width 1..6, 2..4 classes), float64."""
    width, classes = draw(st.integers(1, 6)), draw(st.integers(2, 4))
    torch.manual_seed(draw(st.integers(0, 1000)))
    return nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, classes)).double()


@st.composite
def valid_certificate_inputs(draw):
    """A ReLU net and a finite float batch [B >= 1, 3] of any scale, in the net's dtype."""
    model = _relu_net(draw)
    x = torch.randn(draw(st.integers(1, 4)), 3, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    dtype = draw(st.sampled_from([torch.float64, torch.float64, torch.float32]))
    return model.to(dtype), x.to(dtype)


_INVALID_CERT = ("nan", "inf", "integer_x", "wrong_features", "no_batch_dim", "dtype_mismatch")


@st.composite
def invalid_certificate_inputs(draw):
    model, x = draw(valid_certificate_inputs())
    defect = draw(st.sampled_from(_INVALID_CERT))
    x = x.clone()
    if defect in ("nan", "inf"):
        x[draw(st.integers(0, x.shape[0] - 1)), draw(st.integers(0, 2))] = float(defect)
    elif defect == "integer_x":
        x = x.round().long()
    elif defect == "wrong_features":
        x = x[:, :2]
    elif defect == "no_batch_dim":
        x = x[0]
    else:
        x = x.to(torch.float32 if x.dtype == torch.float64 else torch.float64)
    return model, x, defect


@pytest.mark.parametrize("cert", [simplex_certificate, decision_boundary_certificate])
def test_certificates_on_valid_inputs_are_sound_radii(cert):
    @FUZZ
    @given(valid_certificate_inputs(), st.integers(0, 2**16))
    def check(case, seed):
        model, x = case
        r = cert(model, x)  # no error allowed
        assert r.shape == (x.shape[0],) and r.dtype == x.dtype
        # inf is a correct radius only for a net that is constant around x; NaN or negative never is.
        assert not torch.isnan(r).any() and (r >= 0).all(), f"radii {r}"
        # Soundness on random points strictly inside each ball: the predicted class does not change.
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for b in range(x.shape[0]):
                if not torch.isfinite(r[b]) or r[b] == 0:
                    continue
                d = torch.randn(64, 3, generator=g, dtype=torch.float64)
                d = d / d.norm(dim=1, keepdim=True) * torch.rand(64, 1, generator=g, dtype=torch.float64)
                pts = (x[b].double() + 0.99 * float(r[b]) * d).to(x.dtype)
                pred, preds = model(x[b:b + 1]).argmax(1), model(pts).argmax(1)
                assert (preds == pred).all(), f"class changes inside the certified radius {float(r[b])}"

    check()


@pytest.mark.parametrize("cert", [simplex_certificate, decision_boundary_certificate])
def test_certificates_reject_each_invalid_input_naming_the_argument(cert):
    @FUZZ
    @given(invalid_certificate_inputs())
    def check(case):
        model, x, defect = case
        with pytest.raises((ValueError, TypeError)) as info:
            cert(model, x)
        assert re.search(r"\bx\b", str(info.value)), f"{defect}: error does not name x: {info.value}"

    check()
