"""scikit-learn's bundled handwritten digits (1797 real 8x8 images): the offline default data set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Unpack

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from lightning_robust.datamodules.base import LoaderOptions, RobustDataModule
from lightning_robust.utils.validation import check_choice, check_fraction

__all__ = ["DigitsDataModule", "load_digits_tensors"]


def load_digits_tensors(image_size: int = 8, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as ``(images [N, C, S, S] in [0, 1], labels [N])``.

    The originals are 8x8 with 17 grey levels (0..16); they are scaled to [0, 1] and, for ``image_size``
    28 or 32, upsampled bilinearly (antialiased), so MNIST/CIFAR-shaped nets run on real digits offline.
    """
    from sklearn.datasets import load_digits

    check_choice("image_size", image_size, (8, 16, 28, 32))
    check_choice("channels", channels, (1, 3))
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)
    if channels == 3:
        x = x.repeat(1, 3, 1, 1)
    return x.contiguous(), torch.tensor(bunch.target, dtype=torch.long)


class DigitsDataModule(RobustDataModule):
    """The 1797 scikit-learn digits, split by seed into train / val / test; needs no download.

    Args:
        image_size: 8 (native), 16, 28 or 32 (bilinear upsampling).
        channels: 1, or 3 (grey replicated, for colour nets and colour attacks).
        test_fraction: share of the 1797 images held out as the test set (stratification is not needed
            at this size: classes are balanced to within a few images).
        classes: optional subset of digit classes to keep, relabelled ``0..len(classes)-1`` in the
            given order.
        **base: the :class:`RobustDataModule` arguments (``batch_size``, ``val_fraction``, ``seed``,
            ``with_index``, ...), listed explicitly below for LightningCLI.

    Raises:
        ValueError: on an unsupported size, channel count, fraction, or class list.

    Example:
        >>> dm = DigitsDataModule(batch_size=64, image_size=28)
        >>> dm.setup(); x, y = next(iter(dm.train_dataloader())); x.shape
        torch.Size([64, 1, 28, 28])
    """

    def __init__(
        self,
        image_size: int = 8,
        channels: int = 1,
        test_fraction: float = 0.2,
        classes: Sequence[int] | None = None,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        super().__init__(**loader)
        check_choice("image_size", image_size, (8, 16, 28, 32))
        check_choice("channels", channels, (1, 3))
        check_fraction("test_fraction", test_fraction)
        if classes is not None:
            classes = list(classes)
            if not classes or len(set(classes)) != len(classes) or any(c not in range(10) for c in classes):
                raise ValueError(f"classes must be distinct digits in 0..9, got {classes!r}")
        self.image_size, self.channels, self.test_fraction = image_size, channels, test_fraction
        self.classes = classes
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else 10

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        x, y = load_digits_tensors(self.image_size, self.channels)
        if self.classes is not None:
            mapping = torch.full((10,), -1, dtype=torch.long)
            mapping[torch.tensor(self.classes)] = torch.arange(len(self.classes))
            keep = mapping[y] >= 0
            x, y = x[keep], mapping[y[keep]]
        # The test split uses its own fixed generator so that changing `seed` (the val split and the
        # experiment seed) never leaks test images into training.
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(20240601))
        n_test = round(self.test_fraction * len(y))
        test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
        return TensorDataset(x[train], y[train]), (TensorDataset(x[test], y[test]) if n_test else None)
