"""Datasets behind the vision DataModules, and the pure functions they are built from.

* :class:`TensorImageDataset`: a whole data set held as one ``uint8`` tensor (CIFAR-10, MNIST). Random
  crop + flip run vectorised over a batch (``__getitems__``, which DataLoader calls with the batch's
  indices), which is what makes the CIFAR-10 loader faster than the per-image PIL pipeline.
* :class:`ImageFileDataset`: one image file per sample (CelebA, VisDA-2017, MNIST-M), decoded with PIL
  inside a guard that turns any decoder failure into an error naming the file, then torchvision transforms.
* :func:`random_crop_flip`, :func:`resize_uint8`, :func:`rgb_to_grey_uint8`, :func:`select_classes`,
  :func:`proportional_subsample`: the maths, as pure functions.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lightning_robust.datamodules.formats import open_image
from lightning_robust.utils.validation import check_probability_vector

__all__ = [
    "ImageFileDataset",
    "TensorImageDataset",
    "proportional_subsample",
    "random_crop_flip",
    "resize_uint8",
    "rgb_to_grey_uint8",
    "select_classes",
]


# ---- pure functions ---------------------------------------------------------------------------------
def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop after zero padding, and random horizontal flip, for a batch.

    Equivalent in distribution to torchvision's ``RandomCrop(size, padding=pad)`` followed by
    ``RandomHorizontalFlip()`` applied image by image: offsets ``(i, j)`` uniform in ``0..2*pad`` on the
    zero-padded image, flip with probability 1/2.

    Args:
        x: ``[B, C, H, W]`` images (any dtype).
        pad: zero padding on each side before cropping back to ``H x W`` (0: no crop).
        flip: flip each image left-right with probability 1/2.
        generator: optional torch generator (default: the global one, seeded per DataLoader worker).
    """
    if pad <= 0 and not flip:
        return x
    pad = max(pad, 0)
    B, C, H, W = x.shape
    src = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    Wp = W + 2 * pad
    i = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    j = torch.randint(0, 2 * pad + 1, (B,), generator=generator)
    cols = torch.arange(W).expand(B, W)
    if flip:
        flipped = torch.rand(B, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(-1), cols)
    # One gather over the flattened padded image does crop and flip together; it is much cheaper than
    # advanced indexing, whose thread-pool start-up dominates on small batches.
    flat = (i[:, None, None] + torch.arange(H)[None, :, None]) * Wp + (j[:, None, None] + cols[:, None, :])
    index = flat.reshape(B, 1, H * W).expand(B, C, H * W)
    return src.flatten(2).gather(2, index).view(B, C, H, W)


def resize_uint8(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize ``uint8`` images ``[N, C, H, W]`` to ``size x size`` (bilinear, antialiased), in chunks."""
    if x.shape[-2:] == (size, size):
        return x
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for s in range(0, x.shape[0], chunk):
        y = F.interpolate(x[s:s + chunk].float(), size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)
        out[s:s + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def rgb_to_grey_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[N, 3, H, W]`` -> ``[N, 1, H, W]`` uint8 with PIL's ITU-R 601-2 luma (``Image.convert("L")``).

    PIL computes ``(R*19595 + G*38470 + B*7471 + 0x8000) >> 16`` in integers; so does this, so grey
    CIFAR from a tensor equals grey CIFAR from PIL exactly.
    """
    w = torch.tensor([19595, 38470, 7471], dtype=torch.int32).view(1, 3, 1, 1)
    return ((x.to(torch.int32) * w).sum(1, keepdim=True) + 0x8000).bitwise_right_shift(16).to(torch.uint8)


def select_classes(labels: torch.Tensor, classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the samples of ``classes`` and relabel them ``0..len(classes)-1`` in the given order.

    Returns:
        ``(kept indices, new labels)``.
    """
    cls = torch.as_tensor(list(classes), dtype=torch.long)
    size = max(int(labels.max()) + 1 if labels.numel() else 0, int(cls.max()) + 1 if cls.numel() else 0)
    mapping = torch.full((size,), -1, dtype=torch.long)
    mapping[cls] = torch.arange(len(cls))
    new = mapping[labels]
    keep = torch.nonzero(new >= 0).flatten()
    return keep, new[keep]


def proportional_subsample(labels: torch.Tensor, proportions: Sequence[float] | torch.Tensor,
                           seed: int = 0) -> torch.Tensor:
    """The largest subset whose class frequencies follow ``proportions``, chosen deterministically.

    With ``n_k`` samples of class ``k`` and target proportions ``p_k``, the total is
    ``N = min_{k: p_k > 0} n_k / p_k`` and class ``k`` keeps ``floor(p_k N)`` samples (so at least one
    class is kept whole), picked in the order of one permutation drawn from ``seed``. This builds the
    imbalanced mixtures of the Normalized-Wasserstein experiments (arXiv:1902.00415) from a balanced set.

    Args:
        labels: ``[N]`` class labels in ``0..K-1``.
        proportions: ``K`` non-negative weights summing to one.
        seed: seed of the permutation that decides which samples of each class are kept.

    Returns:
        Sorted indices of the kept samples.

    Raises:
        ValueError: if ``proportions`` is not a probability vector or a class with ``p_k > 0`` is empty.
    """
    p = check_probability_vector("class_proportions", proportions)
    K = p.numel()
    counts = torch.bincount(labels, minlength=K)[:K].double()
    pos = p > 0
    if (counts[pos] == 0).any():
        empty = torch.nonzero(pos & (counts == 0)).flatten().tolist()
        raise ValueError(f"class_proportions gives weight to classes {empty}, which have no samples")
    total = float((counts[pos] / p[pos]).min())
    keep_n = torch.floor(p * total + 1e-9).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    ranked = labels[order]
    kept: list[torch.Tensor] = []
    for k in range(K):
        if keep_n[k] > 0:
            kept.append(order[ranked == k][: int(keep_n[k])])
    return torch.cat(kept).sort().values if kept else torch.zeros(0, dtype=torch.long)


# ---- datasets ---------------------------------------------------------------------------------------
@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run the enclosed tensor ops on one intra-op thread, then restore the previous setting.

    Batch augmentation is a handful of memory-bound ops on ~400k bytes: waking the intra-op thread pool
    for each costs more than it saves, up to 100x more on a loaded machine (measured: 167 ms vs 2 ms per
    batch of 128 on 2 busy cores). DataLoader workers already run single-threaded, so this only changes
    ``num_workers=0``.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class TensorImageDataset(Dataset):
    """Images held as one ``uint8`` tensor ``[N, C, H, W]``; items are ``(float image in [0, 1], target)``.

    Args:
        images: ``uint8`` tensor ``[N, C, H, W]``.
        targets: ``[N]`` class labels (or ``[N, K]`` multi-label targets).
        pad: random-crop padding for training (0: none).
        flip: random horizontal flips for training.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, pad: int = 0, flip: bool = False) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(targets) != len(images):
            raise ValueError(f"images and targets must have the same length, got {len(images)} and {len(targets)}")
        self.images, self.targets, self.pad, self.flip = images, targets, pad, flip

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _batch(self, idx: torch.Tensor) -> torch.Tensor:
        # index_select, not images[idx]: see random_crop_flip on advanced indexing's overhead.
        with _single_threaded():
            x = random_crop_flip(self.images.index_select(0, idx), self.pad, self.flip)
            return x.float().div_(255.0)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Any]:
        x = self._batch(torch.tensor([index]))[0]
        y = self.targets[index]
        return x, (int(y) if y.ndim == 0 else y)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, Any]]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self._batch(idx)
        y = self.targets.index_select(0, idx)
        ys = y.tolist() if y.ndim == 1 else list(y.unbind(0))
        with _single_threaded():
            return list(zip(x.unbind(0), ys))

    def augmented(self, pad: int, flip: bool) -> TensorImageDataset:
        """The same images (shared storage) with training augmentation switched on or off."""
        out = copy.copy(self)
        out.pad, out.flip = pad, flip
        return out

    def select(self, indices: torch.Tensor, targets: torch.Tensor | None = None) -> TensorImageDataset:
        """A new dataset of the given samples (optionally relabelled)."""
        return TensorImageDataset(self.images.index_select(0, indices),
                                  self.targets.index_select(0, indices) if targets is None else targets,
                                  self.pad, self.flip)


class ImageFileDataset(Dataset):
    """One image file per sample; items are ``(transform(image), target)``.

    Args:
        paths: image file paths.
        targets: ``[N]`` class labels or ``[N, K]`` targets (e.g. CelebA attributes).
        transform: a callable on a PIL image returning a tensor (torchvision transforms).
        mode: PIL mode the image is converted to before the transform (``"RGB"`` or ``"L"``).
    """

    def __init__(self, paths: Sequence[str], targets: torch.Tensor, transform: Callable[[Any], Any],
                 mode: str = "RGB") -> None:
        if len(paths) != len(targets):
            raise ValueError(f"paths and targets must have the same length, got {len(paths)} and {len(targets)}")
        self.paths, self.targets, self.transform, self.mode = list(paths), targets, transform, mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img = open_image(self.paths[index], self.mode)
        y = self.targets[index]
        return self.transform(img), (int(y) if y.ndim == 0 else y)

    def with_transform(self, transform: Callable[[Any], Any]) -> ImageFileDataset:
        """The same files with another transform (e.g. training augmentation)."""
        out = copy.copy(self)
        out.transform = transform
        return out

    def select(self, indices: torch.Tensor, targets: torch.Tensor | None = None) -> ImageFileDataset:
        """A new dataset of the given samples (optionally relabelled)."""
        idx = indices.tolist()
        return ImageFileDataset([self.paths[i] for i in idx], self.targets[indices] if targets is None else targets,
                                self.transform, self.mode)
