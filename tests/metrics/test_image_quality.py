"""Offline FID / KID / IS: torchmetrics with our feature network against scipy and brute-force references."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_robust.metrics import ClassifierFeatures, image_quality
from lightning_robust.nets import SmallCNN
from lightning_robust.utils import FeatureExtractor


@pytest.fixture
def net(trained_digits_cnn: SmallCNN) -> SmallCNN:
    return trained_digits_cnn


@pytest.fixture
def digits(digits_tensors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return digits_tensors[0]


def _noisy(x: torch.Tensor, seed: int, noise: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + noise * torch.randn(x.shape, generator=g)).clamp(0, 1)


def _raw_features(net: SmallCNN, x: torch.Tensor) -> np.ndarray:
    if x.shape[-1] != 8:
        x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad(), FeatureExtractor(net, "classifier.3") as fx:
        return fx(x).double().numpy()


def test_feature_wrapper_resizes_converts_and_stays_frozen(net, digits):
    feats = ClassifierFeatures(net, "classifier.3")
    assert feats.num_features == 200 and (feats.input_size, feats.in_channels) == (8, 1)
    x = F.interpolate(digits[:6], size=(16, 16), mode="bilinear")  # a 16 px generator's images
    assert np.allclose(feats(x).numpy(), _raw_features(net, x), atol=1e-6)
    rgb = x.repeat(1, 3, 1, 1)  # grey replicated to colour and back gives the same features
    assert torch.allclose(feats(rgb), feats(x), atol=1e-6)
    feats.train()
    assert not feats.net.training and all(not p.requires_grad for p in feats.parameters())
    assert ClassifierFeatures(net, None).num_features == 10  # logits, for the Inception Score
    with pytest.raises(ValueError, match=r"layer 'classifier\.9' does not exist"):
        ClassifierFeatures(net, "classifier.9")
    with pytest.raises(ValueError, match="input_size and in_channels must be given"):
        ClassifierFeatures(torch.nn.Linear(4, 2), None)


def test_fid_matches_scipy_reference(net, digits):
    real, fake = digits[:300], _noisy(digits[300:550], 2, 0.2)
    fid = FrechetInceptionDistance(feature=ClassifierFeatures(net))
    fid.update(real, real=True)
    fid.update(fake, real=False)
    a, b = _raw_features(net, real), _raw_features(net, fake)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    ref = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))
    assert ref > 0
    assert float(fid.compute()) == pytest.approx(ref, rel=1e-3)


def test_kid_matches_brute_force_unbiased_mmd(net, digits):
    real, fake = digits[:60], _noisy(digits[60:120], 4, 0.2)
    kid = KernelInceptionDistance(feature=ClassifierFeatures(net), subsets=1, subset_size=60)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    a, b = _raw_features(net, real), _raw_features(net, fake)
    k = lambda u, v: (u @ v.T / u.shape[1] + 1) ** 3  # noqa: E731
    m = len(a)
    kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
    ref = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    assert float(kid.compute()[0]) == pytest.approx(ref, rel=1e-4)


def test_inception_score_matches_formula(net, digits):
    x = digits[:40]
    score = InceptionScore(feature=ClassifierFeatures(net, None), splits=1)
    score.update(x)
    with torch.no_grad():
        p = F.softmax(net(x).double(), dim=1)
    marginal = p.mean(0, keepdim=True)
    ref = math.exp(float((p * (p.log() - marginal.log())).sum(1).mean()))
    assert float(score.compute()[0]) == pytest.approx(ref, rel=1e-5)


def test_image_quality_properties(net, digits):
    feats, logits = ClassifierFeatures(net), ClassifierFeatures(net, None)
    real = digits[:400]
    same = image_quality(real, real, feats, logits, kid_subset_size=100)
    held_out = image_quality(real, digits[400:800], feats, logits, kid_subset_size=100)
    noisy = image_quality(real, _noisy(digits[400:800], 8, 0.4), feats, logits, kid_subset_size=100)
    assert abs(same["fid"]) < 1e-6 * noisy["fid"] and abs(same["kid"]) < 0.1 * noisy["kid"]  # unbiased: noise around 0
    assert held_out["fid"] < noisy["fid"] and held_out["kid"] < noisy["kid"]
    # real digits are confidently and diversely classified: IS near the 10 classes; noise lowers it
    assert 7.0 < held_out["is"] <= 10.0 and noisy["is"] < held_out["is"]
    # the global RNG is left untouched by KID / IS subset sampling
    torch.manual_seed(1)
    image_quality(real, real, feats, logits, kid_subset_size=50)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1))
