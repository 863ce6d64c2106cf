"""Fixtures of the attack tests: a colour (3-channel) digits CNN for the colour attacks."""

from __future__ import annotations

import pytest
import torch

from lightning_robust.nets import SmallCNN


@pytest.fixture(scope="session")
def digits_rgb() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as grey RGB images [N, 3, 8, 8] with labels (the last 397 unseen by the net below)."""
    from lightning_robust.datamodules import load_digits_tensors

    return load_digits_tensors(8, 3)


@pytest.fixture(scope="session")
def rgb_digits_cnn(digits_rgb: tuple[torch.Tensor, torch.Tensor]) -> SmallCNN:
    """A SmallCNN for grey-RGB 8x8 digits trained for about a second (~93% on the held-out digits)."""
    x, y = digits_rgb
    torch.manual_seed(0)
    net = SmallCNN(in_channels=3, num_classes=10, input_size=8)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        for idx in torch.randperm(1400, generator=g).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()
