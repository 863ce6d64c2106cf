"""utils.modules: the one train/eval mode guard and the one dotted-name layer lookup."""

import pytest
import torch
from torch import nn

from lightning_robust.attacks import model_mode as attacks_model_mode
from lightning_robust.utils import model_mode, resolve_layer


def _mixed() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Sequential(nn.Dropout(), nn.Linear(3, 2)))
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a training net: `net.train(was_training)` would wake it up
    return net


def _flags(net: nn.Module) -> list[bool]:
    return [m.training for m in net.modules()]


@pytest.mark.parametrize("mode", ["eval", "train", "keep"])
def test_model_mode_restores_every_submodule_flag(mode):
    net = _mixed()
    before = _flags(net)
    with model_mode(net, mode):
        inside = _flags(net)
    assert _flags(net) == before
    if mode == "eval":
        assert not any(inside)
    elif mode == "train":
        assert all(inside)
    else:
        assert inside == before


def test_model_mode_restores_on_exception_and_takes_several_modules():
    a, b = _mixed(), nn.Linear(2, 2).eval()
    before = _flags(a) + _flags(b)
    inside: list[bool] = []

    def body() -> None:
        with model_mode([a, None, b], "train"):
            inside.extend(_flags(a) + _flags(b))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        body()
    assert inside and all(inside)
    assert _flags(a) + _flags(b) == before


def test_model_mode_rejects_bad_mode_and_non_modules():
    with pytest.raises(ValueError, match="mode"), model_mode(nn.Linear(1, 1), "inference"):
        pass
    with pytest.raises(TypeError, match="model"), model_mode([nn.Linear(1, 1), lambda x: x], "eval"):  # type: ignore[list-item]
        pass


def test_attacks_reexport_is_the_same_function():
    assert attacks_model_mode is model_mode


def test_resolve_layer_finds_dotted_names_and_names_valid_ones():
    net = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.ReLU(), nn.Linear(3, 2)))
    assert resolve_layer(net, "1.1") is net[1][1]
    assert resolve_layer(net, "") is net
    with pytest.raises(ValueError, match=r"'1\.2' does not exist.*'1\.1'"):
        resolve_layer(net, "1.2")
    with pytest.raises(TypeError, match="layer"):
        resolve_layer(net, 1)  # type: ignore[arg-type]


def test_certify_uses_the_shared_guard():
    # the certificate's tracing pass runs in eval mode and leaves a mixed-mode net exactly as found
    from lightning_robust.certify import simplex_certificate

    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    net.train()
    net[2].eval()
    before = _flags(net)
    simplex_certificate(net, torch.rand(2, 1, 2, 2))
    assert _flags(net) == before
