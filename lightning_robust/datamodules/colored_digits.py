"""The bundled digits as two domains: grey (source) and MNIST-M-style colour blends (target), made on the fly."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Unpack

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from lightning_robust.datamodules.base import LoaderOptions, RobustDataModule
from lightning_robust.datamodules.digits import load_digits_tensors
from lightning_robust.datamodules.image_datasets import proportional_subsample
from lightning_robust.utils.validation import check_choice, check_fraction, check_probability_vector, check_seed

__all__ = ["ColoredDigitsDataModule", "colorize_digits"]

_SPLIT_SEED = 20240601  # the same held-out test split as DigitsDataModule
_HALF_SEED = 1902_00415


def colorize_digits(x: torch.Tensor, seed: int = 0, grid: int = 3) -> torch.Tensor:
    """MNIST-M-style colour versions of grey digits: ``|background - digit|`` per channel.

    MNIST-M (Ganin et al., arXiv 1505.07818) blends each digit over a patch of a colour photo. Without
    photos, each background here is a smooth random colour field (a ``grid x grid`` lattice of uniform
    random colours, bilinearly upsampled), so colour, contrast and polarity change from image to image
    while the digit's shape is kept. Deterministic given ``seed`` and the image order.

    Args:
        x: ``[N, C, S, S]`` grey digits in [0, 1] (``C`` 1 or 3; the first channel is used).
        seed: seed of the backgrounds.
        grid: resolution of the colour lattice.

    Returns:
        ``[N, 3, S, S]`` images in [0, 1].
    """
    n, _, s, _ = x.shape
    g = torch.Generator().manual_seed(seed)
    lattice = torch.rand(n, 3, grid, grid, generator=g)
    background = F.interpolate(lattice, size=(s, s), mode="bilinear", align_corners=True)
    return (background - x[:, :1]).abs().clamp(0.0, 1.0)


class ColoredDigitsDataModule(RobustDataModule):
    """A CPU-scale domain-adaptation pair from scikit-learn's 1797 digits: grey source, coloured target.

    With ``colored=False`` the digits are grey (replicated over ``channels``); with ``colored=True`` they are
    blended over random colour fields (:func:`colorize_digits`), a small stand-in for MNIST -> MNIST-M.
    ``half`` keeps one of two fixed disjoint halves of the digits, so that a source module
    (``half=0``) and a target module (``half=1``) never share an image. ``classes`` and
    ``class_proportions`` build the imbalanced label mixtures of the NW experiments (the largest subsample
    with those class frequencies, :func:`~lightning_robust.datamodules.proportional_subsample`), applied
    to the test split too when ``test_proportions``.

    Args:
        colored: make the colour (target) domain.
        image_size: 8, 16, 28 or 32.
        channels: 1 or 3 (colour images always have 3).
        half: ``0`` or ``1`` for one half of the digits, ``None`` for all.
        classes: digits to keep, relabelled ``0..len(classes)-1`` in the given order.
        class_proportions: proportions of the kept classes (non-negative, summing to one).
        test_proportions: subsample the test split with ``class_proportions`` too.
        test_fraction: share of the (half) data set held out for testing.
        color_seed: seed of the colour backgrounds.
        proportions_seed: seed of the proportional subsample.
        mnist_root: read the 10,000 real MNIST *test* digits from this folder (IDX files, checksum-verified;
            see :class:`~lightning_robust.datamodules.MNISTDataModule`) instead of the bundled 8x8 digits;
            ``image_size`` 28 is native then. The halves, test split and proportions work the same way.
        batch_size, eval_batch_size, num_workers, persistent_workers, pin_memory, val_fraction, seed,
            with_index, drop_last: see :class:`~lightning_robust.datamodules.RobustDataModule`.

    Raises:
        ValueError: on bad sizes, halves, classes or proportions.

    Example:
        >>> source = ColoredDigitsDataModule(colored=False, half=0, classes=[1, 4, 8],
        ...                                  class_proportions=[0.625, 0.3125, 0.0625])
        >>> target = ColoredDigitsDataModule(colored=True, half=1, classes=[1, 4, 8],
        ...                                  class_proportions=[0.0625, 0.3125, 0.625])
    """

    loader_defaults: ClassVar[LoaderOptions] = {"batch_size": 64}

    def __init__(
        self,
        colored: bool = True,
        image_size: int = 16,
        channels: int = 3,
        half: int | None = None,
        classes: Sequence[int] | None = None,
        class_proportions: Sequence[float] | None = None,
        test_proportions: bool = True,
        test_fraction: float = 0.2,
        color_seed: int = 0,
        proportions_seed: int = 0,
        mnist_root: str | None = None,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        check_seed("color_seed", color_seed)
        check_seed("proportions_seed", proportions_seed)
        super().__init__(**loader)
        check_choice("image_size", image_size, (8, 16, 28, 32))
        check_choice("channels", channels, (1, 3))
        if colored and channels != 3:
            raise ValueError(f"channels must be 3 for colored digits, got {channels}")
        if half is not None:
            check_choice("half", half, (0, 1))
        check_fraction("test_fraction", test_fraction)
        if classes is not None:
            classes = list(classes)
            if not classes or len(set(classes)) != len(classes) or any(c not in range(10) for c in classes):
                raise ValueError(f"classes must be distinct digits in 0..9, got {classes!r}")
        n_kept = len(classes) if classes is not None else 10
        self.class_proportions: list[float] | None = None
        if class_proportions is not None:
            p = check_probability_vector("class_proportions", class_proportions)
            if p.numel() != n_kept:
                raise ValueError(f"class_proportions must have one entry per kept class ({n_kept}), got {p.numel()}")
            self.class_proportions = p.tolist()
        self.colored, self.image_size, self.channels, self.half = bool(colored), image_size, channels, half
        self.classes, self.test_proportions, self.test_fraction = classes, bool(test_proportions), test_fraction
        self.color_seed, self.proportions_seed = color_seed, proportions_seed
        self.mnist_root = mnist_root
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else 10

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        if self.mnist_root is not None:
            from lightning_robust.datamodules.mnist import read_mnist

            images, labels = read_mnist(self.mnist_root, "test")
            x = F.interpolate(torch.from_numpy(images.copy()).float().unsqueeze(1) / 255.0,
                              size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True).clamp(0, 1) if self.image_size != 28 else \
                torch.from_numpy(images.copy()).float().unsqueeze(1) / 255.0
            y = torch.from_numpy(labels.copy()).long()
        else:
            x, y = load_digits_tensors(self.image_size, 1)
        if self.colored:
            x = colorize_digits(x, self.color_seed)
        elif self.channels == 3:
            x = x.repeat(1, 3, 1, 1)
        idx = torch.arange(len(y))
        if self.half is not None:
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(_HALF_SEED))
            idx = perm[self.half::2].sort().values
        if self.classes is not None:
            mapping = torch.full((10,), -1, dtype=torch.long)
            mapping[torch.tensor(self.classes)] = torch.arange(len(self.classes))
            y = mapping[y]
            idx = idx[y[idx] >= 0]
        perm = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(_SPLIT_SEED))]
        n_test = round(self.test_fraction * len(perm))
        test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
        if self.class_proportions is not None:
            train = train[proportional_subsample(y[train], self.class_proportions, self.proportions_seed)]
            if self.test_proportions and n_test:
                test = test[proportional_subsample(y[test], self.class_proportions, self.proportions_seed)]
        return TensorDataset(x[train], y[train]), (TensorDataset(x[test], y[test]) if n_test else None)
