"""Small trained piecewise-linear nets shared by the certificate tests (float64 for exact comparisons)."""

from __future__ import annotations

import pytest
import torch

from lightning_robust.nets import MLP


def train_net(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 2e-3,
              seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="session")
def trained_digits_mlp(digits_tensors) -> MLP:
    """A 64-64-64-10 ReLU MLP trained for a few seconds on the first 1400 digits, in float64."""
    torch.manual_seed(0)
    x, y = digits_tensors
    return train_net(MLP(64, 10, (64, 64)), x[:1400], y[:1400], epochs=15).double()


@pytest.fixture(scope="session")
def toy_2d():
    """A 2-16-16-3 ReLU MLP trained on a 2-D three-class problem (float64) and its training points."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(600, 2, generator=g, dtype=torch.float64) * 2 - 1
    y = ((x.pow(2).sum(1) < 0.35).long() + (x[:, 0] > 0.45).long())
    net = MLP(2, 3, (16, 16)).double()
    return train_net(net, x, y, epochs=60, lr=1e-2), x, y
