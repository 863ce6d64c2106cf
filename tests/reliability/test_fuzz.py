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
NAMED = re.compile(r"\b(x|y|inputs?|labels?)\b")


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


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8]


@st.composite
def attack_inputs(draw):
    batch = draw(st.integers(0, 3))
    dims = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(_DTYPES))
    lo = draw(st.sampled_from([0.0, 0.0, 0.0, -0.5, 0.3]))
    hi = draw(st.sampled_from([1.0, 1.0, 1.0, 1.7, 0.6]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = lo + (hi - lo) * torch.rand(batch, *dims, generator=g, dtype=torch.float64)
    special = draw(st.sampled_from([None, None, None, float("nan"), float("inf")]))
    if special is not None and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = special
    x = (x * 255).round().to(dtype) if not dtype.is_floating_point else x.to(dtype)
    n_labels = draw(st.sampled_from([batch, batch, batch, batch + 1]))
    y = torch.randint(draw(st.sampled_from([0, 0, 0, -1])), draw(st.sampled_from([4, 4, 4, 6])), (n_labels,),
                      generator=g)
    if draw(st.booleans()) and draw(st.booleans()):
        y = y.float()
    return x, y


@pytest.mark.parametrize("attack", [
    PGD(eps=0.1, alpha=0.05, steps=3, norm="linf"),
    PGD(eps=0.5, alpha=0.2, steps=3, norm="l2"),
    FGSM(eps=0.1, random_start=True),
], ids=["pgd-linf", "pgd-l2", "fgsm-rs"])
def test_attacks_on_fuzzed_inputs(attack):
    models = {torch.float32: AnyShapeNet(), torch.float64: AnyShapeNet().double()}

    @FUZZ
    @given(attack_inputs())
    def check(xy):
        x, y = xy
        # float32 and float64 inputs meet a model of their dtype; half precision meets a float32 model,
        # which must be a clear dtype error (no autocast here).
        model = models.get(x.dtype, models[torch.float32])
        try:
            out = attack(model, x, y, generator=torch.Generator().manual_seed(0))
        except (ValueError, TypeError) as err:
            assert NAMED.search(str(err)), f"error does not name the argument: {err}"
            return
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all(), "attack produced NaN/inf from valid inputs"
        assert attack.threat.contains(out.double(), x.double(), tol=1e-3 if x.dtype.itemsize < 4 else 1e-6).all()
        assert ((out >= 0) & (out <= 1)).all()

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
    op = draw(st.sampled_from(["flip", "truncate", "extend", "random", "none"]))
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


@FUZZ
@given(mutated_idx(), st.booleans())
def test_idx_parser_on_mutated_files(tmp_path_factory, case, gz):
    import gzip

    raw, arr, op = case
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
    if op == "none":
        assert np.array_equal(out, arr)


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

@st.composite
def certificate_inputs(draw):
    width = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 4))
    feat = draw(st.sampled_from([3, 3, 3, 2]))
    torch.manual_seed(draw(st.integers(0, 1000)))
    model = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, draw(st.integers(2, 4)))).double()
    x = torch.randn(batch, feat, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    special = draw(st.sampled_from([None, None, float("nan"), float("inf")]))
    if special is not None:
        x[0, 0] = special
    dtype = draw(st.sampled_from([torch.float64, torch.float64, torch.float32, torch.int64]))
    return model, x.to(dtype)


@pytest.mark.parametrize("cert", [simplex_certificate, decision_boundary_certificate])
def test_certificates_on_fuzzed_inputs(cert):
    @FUZZ
    @given(certificate_inputs())
    def check(case):
        model, x = case
        if x.dtype != torch.float64 and x.is_floating_point():
            model = model.to(x.dtype)
        try:
            r = cert(model, x)
        except (ValueError, TypeError) as err:
            assert NAMED.search(str(err)) or "model" in str(err), f"unclear error: {err}"
            return
        assert r.shape == (x.shape[0],)
        # inf is a correct radius only for a net that is constant around x; NaN or negative never is.
        assert not torch.isnan(r).any() and (r >= 0).all(), f"radii {r}"
        assert torch.isfinite(x).all(), "a non-finite input was certified"

    check()
