"""CertifiedAccuracy against a brute-force count; batching-invariant; argument checks."""

import pytest
import torch

from lightning_robust.metrics import CertifiedAccuracy, certified_accuracy


def _brute(radius, preds, target, radii):
    out = []
    for eps in radii:
        ok = [bool(p == t and (r > eps or eps == 0)) for r, p, t in zip(radius.tolist(), preds.tolist(),
                                                                         target.tolist())]
        out.append(sum(ok) / len(ok))
    return torch.tensor(out)


def test_matches_brute_force_and_is_batch_invariant():
    g = torch.Generator().manual_seed(0)
    radius = torch.rand(100, generator=g) * 0.6
    radius[::7] = 0.0
    radius[3] = float("inf")
    preds, target = torch.randint(0, 3, (100,), generator=g), torch.randint(0, 3, (100,), generator=g)
    radii = (0.0, 0.1, 0.25, 0.5)
    expected = _brute(radius, preds, target, radii)
    whole = CertifiedAccuracy(radii)
    whole.update(radius, preds, target)
    split = CertifiedAccuracy(radii)
    for sl in (slice(0, 13), slice(13, 64), slice(64, 100)):
        split.update(radius[sl], preds[sl], target[sl])
    assert torch.allclose(whole.compute(), expected) and torch.allclose(split.compute(), expected)
    assert torch.allclose(certified_accuracy(radius, preds == target, radii), expected)
    # non-increasing in the radius; the first entry is the clean accuracy
    acc = whole.compute()
    assert (acc[1:] <= acc[:-1]).all() and acc[0] == (preds == target).float().mean()


def test_empty_and_bad_arguments():
    m = CertifiedAccuracy((0.0, 0.5))
    assert torch.equal(m.compute(), torch.zeros(2))
    with pytest.raises(ValueError, match="radii"):
        CertifiedAccuracy(())
    with pytest.raises(ValueError, match=r"radii\[1\]"):
        CertifiedAccuracy((0.1, -0.2))
    with pytest.raises(ValueError, match="same number"):
        m.update(torch.rand(3), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
