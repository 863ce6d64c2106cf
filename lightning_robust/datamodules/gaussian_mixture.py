"""A 2-D Gaussian mixture on a grid with given proportions (the NW-GAN paper's synthetic experiment)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Unpack

import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_robust.datamodules.base import LoaderOptions, RobustDataModule
from lightning_robust.utils.validation import check_positive, check_positive_int, check_probability_vector, check_seed

__all__ = ["GaussianMixtureDataModule", "grid_mixture"]


def grid_mixture(grid_size: int = 3, spacing: float = 2.0) -> torch.Tensor:
    """Centres of a ``grid_size x grid_size`` grid, centred on the origin: ``[grid_size**2, 2]``."""
    check_positive_int("grid_size", grid_size)
    check_positive("spacing", spacing)
    r = (torch.arange(grid_size, dtype=torch.float32) - (grid_size - 1) / 2) * spacing
    gx, gy = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([gx.flatten(), gy.flatten()], dim=1)


class GaussianMixtureDataModule(RobustDataModule):
    """Samples ``x ~ sum_k pi_k N(mu_k, std^2 I)`` with ``mu_k`` on a grid; labels are component indices.

    Args:
        grid_size: the grid is ``grid_size x grid_size`` components (3 gives the paper's 9 modes).
        spacing: distance between neighbouring centres.
        std: standard deviation of every component.
        proportions: mixture weights pi (length ``grid_size**2``, non-negative, summing to one);
            uniform when ``None``.
        n_train: training samples (the val split comes out of these, by ``val_fraction``).
        n_test: test samples.
        data_seed: seed of the sampling (fixed data set independent of the training seed).
        batch_size, ...: the :class:`RobustDataModule` arguments.

    Attributes:
        centers: ``[K, 2]`` component means; ``proportions``: ``[K]`` tensor of pi.

    Raises:
        ValueError: if proportions are negative, do not sum to one or have the wrong length.

    Example:
        >>> dm = GaussianMixtureDataModule(proportions=[0.3, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    """

    loader_defaults: ClassVar[LoaderOptions] = {"batch_size": 256}

    def __init__(
        self,
        grid_size: int = 3,
        spacing: float = 2.0,
        std: float = 0.1,
        proportions: Sequence[float] | None = None,
        n_train: int = 10000,
        n_test: int = 2000,
        data_seed: int = 1234,
        **loader: Unpack[LoaderOptions],
    ) -> None:
        check_seed("data_seed", data_seed)
        super().__init__(**loader)
        self.centers = grid_mixture(grid_size, spacing)
        k = self.centers.shape[0]
        if proportions is None:
            pi = torch.full((k,), 1.0 / k, dtype=torch.float64)
        else:
            pi = check_probability_vector("proportions", proportions)
            if pi.numel() != k:
                raise ValueError(f"proportions must have grid_size**2 = {k} entries, got {pi.numel()}")
        self.proportions = pi.float()
        self.std = check_positive("std", std)
        self.n_train = check_positive_int("n_train", n_train)
        self.n_test = check_positive_int("n_test", n_test, minimum=0)
        self.data_seed = data_seed
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return int(self.centers.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` points and their component labels."""
        comp = torch.multinomial(self.proportions.double(), n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, generator=generator) * self.std
        return self.centers[comp] + noise, comp

    def log_density(self, x: torch.Tensor) -> torch.Tensor:
        """Exact ``log p(x)`` of the mixture at points ``x`` ([n, 2])."""
        d2 = ((x[:, None, :] - self.centers[None].to(x)) ** 2).sum(-1)
        log_comp = -d2 / (2 * self.std**2) - torch.log(torch.tensor(2 * torch.pi * self.std**2, dtype=x.dtype))
        return torch.logsumexp(log_comp + self.proportions.to(x).clamp_min(1e-30).log(), dim=1)

    def build_datasets(self) -> tuple[Dataset, Dataset | None]:
        g = torch.Generator().manual_seed(self.data_seed)
        x, y = self.sample(self.n_train, g)
        train = TensorDataset(x, y)
        if self.n_test == 0:
            return train, None
        xt, yt = self.sample(self.n_test, g)
        return train, TensorDataset(xt, yt)
