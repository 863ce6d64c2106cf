"""FID, KID and Inception Score with an offline feature network (a classifier trained on the same data).

torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance`,
:class:`~torchmetrics.image.kid.KernelInceptionDistance` and
:class:`~torchmetrics.image.inception.InceptionScore` accept any ``nn.Module`` as the feature network.
Their default, Inception-v3, needs ``torch-fidelity`` and a weights download; offline we use a classifier
trained on the data set being generated (e.g. our SmallCNN on digits), as is customary for MNIST-like
data. Scores from different feature networks are not comparable, so the feature network's name belongs
in the metric's name (``val/fid_smallcnn_digits``, never plain ``val/fid``).

* FID (Heusel et al. 2017, arXiv 1706.08500): ``||μ_r - μ_g||^2 + tr(Σ_r + Σ_g - 2 (Σ_r Σ_g)^{1/2})`` of the
  Gaussians fitted to the features of real and generated images.
* KID (Bińkowski et al. 2018, arXiv 1801.01401): unbiased MMD^2 with the cubic polynomial kernel
  ``k(x, y) = (x·y / dim + 1)^3``, averaged over random subsets.
* Inception Score (Salimans et al. 2016, arXiv 1606.03498): ``exp E_x KL(p(y|x) || p(y))`` from the
  classifier's logits.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_robust.utils.feature_extractor import FeatureExtractor
from lightning_robust.utils.modules import resolve_layer
from lightning_robust.utils.validation import check_finite, check_positive_int

__all__ = ["ClassifierFeatures", "PrecomputedFeatures", "image_quality"]


class ClassifierFeatures(nn.Module):
    """A frozen classifier as the feature network of FID / KID (a layer's activations) or IS (logits).

    Inputs are float images in [0, 1]; they are resized (bilinear, antialiased) to the classifier's input
    side and converted between grey and colour (channel mean / repetition) when those differ, so a
    classifier trained on 8x8 digits can score a 16 px generator. The wrapped net always stays in eval
    mode and receives no gradients.

    Args:
        net: a classifier taking ``[N, in_channels, input_size, input_size]`` images.
        layer: dotted name of the feature layer (``"classifier.3"``, SmallCNN's penultimate ReLU);
            ``None`` for the net's output (logits), as the Inception Score needs.
        input_size: the classifier's input side; read from ``net.input_size`` when omitted.
        in_channels: the classifier's input channels; read from ``net.in_channels`` when omitted.

    Attributes:
        num_features: feature dimension (torchmetrics reads it instead of probing with 299x299 images).

    Raises:
        ValueError: if the layer does not exist, or the input geometry is neither given nor readable.

    Example:
        >>> feats = ClassifierFeatures(trained_smallcnn, "classifier.3")
        >>> fid = FrechetInceptionDistance(feature=feats)
        >>> fid.update(real_images, real=True); fid.update(fake_images, real=False); fid.compute()
    """

    def __init__(self, net: nn.Module, layer: str | None = "classifier.3", input_size: int | None = None,
                 in_channels: int | None = None) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        if layer is not None:
            resolve_layer(net, layer)
        size = input_size if input_size is not None else getattr(net, "input_size", None)
        chans = in_channels if in_channels is not None else getattr(net, "in_channels", None)
        if not isinstance(size, int) or not isinstance(chans, int):
            raise ValueError(f"input_size and in_channels must be given for {type(net).__name__} "
                             f"(it has no integer `input_size` / `in_channels` attributes)")
        check_positive_int("input_size", size)
        check_positive_int("in_channels", chans)
        # A frozen private copy: FID needs a fixed feature network, and the caller's net (often a model that
        # is still used or trained elsewhere) must keep its own requires_grad flags and train/eval mode.
        self.net = copy.deepcopy(net).requires_grad_(False).eval()
        self.layer, self.input_size, self.in_channels = layer, size, chans
        param = next(net.parameters(), None)
        probe = torch.zeros(2, chans, size, size, device=param.device if param is not None else None)
        self.num_features = int(self._features(probe).shape[1])

    def train(self, mode: bool = True) -> ClassifierFeatures:
        """Keep the classifier in eval mode whatever the owner's mode (BatchNorm / dropout stay fixed)."""
        super().train(mode)
        self.net.eval()
        return self

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Convert ``[N, C, H, W]`` images to the classifier's channels and side."""
        if x.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] != self.in_channels:
            if x.shape[1] == 3 and self.in_channels == 1:
                x = x.mean(dim=1, keepdim=True)
            elif x.shape[1] == 1:
                x = x.expand(-1, self.in_channels, -1, -1)
            else:
                raise ValueError(f"cannot convert {x.shape[1]}-channel images for a {self.in_channels}-channel "
                                 "feature network")
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return x

    @torch.no_grad()
    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adapt(x)
        out = self.net(x) if self.layer is None else FeatureExtractor(self.net, self.layer)(x)
        return out.flatten(1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x)


class PrecomputedFeatures(nn.Module):
    """Identity "feature network" for torchmetrics' FID / KID / IS when the features are computed beforehand.

    FID and KID of the same images need the same features; computing them once and passing them to every
    metric halves the cost. ``update`` then takes ``[N, num_features]`` feature rows instead of images.

    Example:
        >>> fid = FrechetInceptionDistance(feature=PrecomputedFeatures(feats.num_features))
        >>> fid.update(feats(real_images), real=True)
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        check_positive_int("num_features", num_features)
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected precomputed features [N, {self.num_features}], got shape {tuple(x.shape)}")
        return x


def _batches(name: str, x: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterable[torch.Tensor]:
    """The batches of ``x``, each checked for NaN / inf (an iterable is checked as it is consumed)."""
    if torch.is_tensor(x):
        check_finite(name, x)
        yield from x.split(batch_size)
    else:
        for i, xb in enumerate(x):
            check_finite(f"{name} (batch {i})", xb)
            yield xb


@torch.no_grad()
def image_quality(
    real: torch.Tensor | Iterable[torch.Tensor],
    fake: torch.Tensor | Iterable[torch.Tensor],
    features: ClassifierFeatures,
    logits: ClassifierFeatures | None = None,
    kid_subsets: int = 10,
    kid_subset_size: int = 100,
    is_splits: int = 10,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, float]:
    """FID, KID (mean) and, given ``logits``, the Inception Score of ``fake`` against ``real`` (one process).

    Args:
        real, fake: image tensors ``[N, C, H, W]`` in [0, 1], or iterables of such batches.
        features: the FID / KID feature network.
        logits: the IS network (the same classifier with ``layer=None``); ``None`` skips IS.
        kid_subsets, kid_subset_size: KID's subsets (``subset_size`` is capped at the sample counts).
        is_splits: IS splits.
        batch_size: chunk size when tensors are given.
        seed: seed of KID's and IS's random subsets (the global RNG is left untouched).

    Returns:
        ``{"fid": ..., "kid": ..., "kid_std": ..., "is": ..., "is_std": ...}`` (IS keys only with ``logits``).
    """
    same = PrecomputedFeatures(features.num_features)  # features computed once for both FID and KID
    fid = FrechetInceptionDistance(feature=same, reset_real_features=True)
    kid = KernelInceptionDistance(feature=same, subsets=kid_subsets, subset_size=kid_subset_size)
    score = None
    if logits is not None:
        score = InceptionScore(feature=PrecomputedFeatures(logits.num_features), splits=is_splits)
    n_real = n_fake = 0
    for xb in _batches("real", real, batch_size):
        f = features(xb)
        fid.update(f, real=True)
        kid.update(f, real=True)
        n_real += len(xb)
    for xb in _batches("fake", fake, batch_size):
        f = features(xb)
        fid.update(f, real=False)
        kid.update(f, real=False)
        if score is not None and logits is not None:
            score.update(logits(xb))
        n_fake += len(xb)
    kid.subset_size = min(kid_subset_size, n_real, n_fake)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = {"fid": float(fid.compute())}
        kid_mean, kid_std = kid.compute()
        out.update(kid=float(kid_mean), kid_std=float(kid_std))
        if score is not None:
            is_mean, is_std = score.compute()
            out.update({"is": float(is_mean), "is_std": float(is_std)})
    return out
