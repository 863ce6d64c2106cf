"""GPU readiness checked on the CPU (issue 25): reduced precision, a device trap, ``torch.compile``.

* Every public function of the pure packages that the function sweep calls (``function_recipes``, plus a
  few OT and certificate functions here) and every image attack runs on bfloat16 and float16 inputs with
  finite results and the input's dtype (none needs to refuse them).
* The same functions and attacks, and a forward pass of every image net, run with
  ``torch.set_default_device("meta")`` while their inputs are on the CPU: a tensor made without
  ``device=`` (``torch.zeros(n)``, ``torch.randperm(n)``) lands on ``meta`` and the first operation that
  mixes it with an input fails. On a GPU the same mistake puts a tensor on the CPU beside CUDA inputs.
* Every LightningModule trains a few steps under ``precision="bf16-mixed"`` (Lightning's CPU autocast)
  with finite weights and logged losses.
* ``torch.compile`` of the nets and of one PGD adversarial-training step matches eager execution.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_robust.attacks import FGSM, PGD, Compose, ReColorAdv, StAdv
from lightning_robust.nets import MLP, SmallCNN
from tests.reliability.function_recipes import RECIPES

PACKAGES = ("attacks", "certify", "ot", "interpret", "defenses")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _points(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# Functions outside the function sweep's recipes (they take no numeric argument) that a GPU user calls.
EXTRA_RECIPES: dict[str, Callable[[], dict[str, Any]]] = {
    "pairwise_cost": lambda: {"x": _points(3, 0), "y": _points(4, 1)},
    "entropic_coupling": lambda: {"d_real": torch.rand(3), "d_fake": torch.rand(4), "cost": torch.rand(3, 4),
                                  "reg": 0.5},
    "primal_transport_cost": lambda: {"coupling": torch.rand(3, 4), "cost": torch.rand(3, 4)},
    "gradient_saliency": lambda: {"model": MLP(4, 3, hidden=(5,)), "x": torch.rand(2, 4)},
    "rgb_to_cieluv": lambda: {"x": torch.rand(2, 3, 4, 4)},
    "cieluv_to_rgb": lambda: {"luv": torch.rand(2, 3, 4, 4)},
    "rgb_to_yuv": lambda: {"x": torch.rand(2, 3, 4, 4)},
    "yuv_to_rgb": lambda: {"yuv": torch.rand(2, 3, 4, 4)},
}


def _functions() -> list[tuple[str, Callable[..., Any]]]:
    out = []
    for pkg in PACKAGES:
        mod = importlib.import_module(f"lightning_robust.{pkg}")
        for name in mod.__all__:
            fn = getattr(mod, name)
            if inspect.isfunction(fn) and (name in RECIPES or name in EXTRA_RECIPES):
                out.append((name, fn))
    return out


FUNCTIONS = _functions()


def _recipe(name: str) -> dict[str, Any]:
    return (RECIPES.get(name) or EXTRA_RECIPES[name])()


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, nn.Module):
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
    result = fn(**kwargs)
    if hasattr(result, "__enter__"):
        with result:
            pass
        return None
    return result


def _floats(result: Any) -> Iterator[torch.Tensor]:
    """Every floating-point tensor in a result (tensors, tuples, dataclasses, NamedTuples)."""
    if torch.is_tensor(result):
        if result.is_floating_point():
            yield result
    elif isinstance(result, (list, tuple)):
        for r in result:
            yield from _floats(r)
    elif hasattr(result, "__dataclass_fields__"):
        for f in result.__dataclass_fields__:
            yield from _floats(getattr(result, f))


def _assert_finite(result: Any, what: str) -> None:
    for t in _floats(result):
        # +inf is a legitimate answer of a certificate (an unbounded radius); NaN and -inf are not.
        assert not torch.isnan(t).any() and not torch.isneginf(t).any(), f"{what}: non-finite output"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(("name", "fn"), FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
def test_pure_functions_take_reduced_precision_inputs(name, fn, dtype):
    # Each runs (none refuses reduced precision today: a function that must refuse should raise a
    # ValueError naming its argument, and be listed here with that check).
    _assert_finite(_call(fn, {k: _cast(v, dtype) for k, v in _recipe(name).items()}), name)


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(in_channels=3, num_classes=10, input_size=8).eval()


def _rgb_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)


ATTACKS = {
    "pgd_linf": lambda: PGD(eps=8 / 255, alpha=2 / 255, steps=3),
    "pgd_l2": lambda: PGD(eps=0.5, steps=3, norm="l2"),
    "fgsm": lambda: FGSM(eps=8 / 255),
    "recoloradv": lambda: ReColorAdv(steps=2, resolution=(4, 6, 6)),
    "stadv": lambda: StAdv(steps=2),
    "recoloradv_stadv_delta": lambda: Compose([ReColorAdv(resolution=(4, 6, 6)), StAdv(), PGD(eps=8 / 255)],
                                              steps=2),
}


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_image_attacks_take_reduced_precision_inputs(name, dtype):
    net = _tiny_cnn().to(dtype)
    x, y = _rgb_batch()
    x = x.to(dtype)
    attack = ATTACKS[name]()
    x_adv = attack(net, x, y)
    assert x_adv.dtype == dtype and x_adv.shape == x.shape
    assert torch.isfinite(x_adv).all() and x_adv.min() >= 0 and x_adv.max() <= 1


# ------------------------------------------------------------------------------------------ device trap
@contextmanager
def _default_device_meta() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.mark.parametrize(("name", "fn"), FUNCTIONS, ids=[n for n, _ in FUNCTIONS])
def test_pure_functions_make_no_tensor_on_the_default_device(name, fn):
    kwargs = _recipe(name)  # inputs on the CPU, made before the trap is set
    with _default_device_meta():
        result = _call(fn, kwargs)
    for t in _floats(result):
        assert t.device.type == "cpu", f"{name} returned a tensor on {t.device}"


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_image_attacks_make_no_tensor_on_the_default_device(name):
    net = _tiny_cnn()
    x, y = _rgb_batch()
    attack = ATTACKS[name]()
    with _default_device_meta():
        x_adv = attack(net, x, y)
    assert x_adv.device.type == "cpu"


def _image_nets() -> dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]]:
    from lightning_robust.nets import DCGANDiscriminator, DCGANGenerator, MobileNetV2, ResNet18, ResNet32, WideResNet

    return {
        "small_cnn": lambda: (SmallCNN(input_size=8), torch.rand(2, 1, 8, 8)),
        "resnet18": lambda: (ResNet18(num_classes=10), torch.rand(2, 3, 32, 32)),
        "resnet32": lambda: (ResNet32(num_classes=10), torch.rand(2, 3, 32, 32)),
        "wide_resnet": lambda: (WideResNet(depth=10, widen_factor=1, num_classes=10), torch.rand(2, 3, 32, 32)),
        "mobilenet_v2": lambda: (MobileNetV2(num_classes=10), torch.rand(2, 3, 32, 32)),
        "dcgan_generator": lambda: (DCGANGenerator(), torch.randn(2, DCGANGenerator().latent_dim)),
        "dcgan_discriminator": lambda: (DCGANDiscriminator(), torch.rand(2, 3, 32, 32)),
        "mlp": lambda: (MLP(4, 3, hidden=(5,)), torch.rand(2, 4)),
    }


IMAGE_NETS = _image_nets()


@pytest.mark.parametrize("name", sorted(IMAGE_NETS))
def test_nets_forward_makes_no_tensor_on_the_default_device(name):
    torch.manual_seed(0)
    net, x = IMAGE_NETS[name]()
    net.eval()
    with _default_device_meta():
        out = net(x)
    assert out.device.type == "cpu" and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------- bf16-mixed fits
def _ddp_cases() -> dict[str, Any]:
    from tests.helpers.ddp_equivalence import CASES

    return CASES


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_ddp_cases()))
def test_every_module_trains_under_bf16_mixed(name, tmp_path):
    from tests.helpers.ddp import flat_params

    case = _ddp_cases()[name]
    model = case.build(2)  # world > 1: the plain module class, not the one-process DDP stand-in
    before = flat_params(model)
    loader = DataLoader(case.data(), batch_size=case.batch_size, shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=3, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=1)
    trainer.fit(model, train_dataloaders=loader)
    after = flat_params(model)
    assert trainer.global_step > 0
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    losses = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    assert all(math.isfinite(v) for v in losses.values()), losses


# ------------------------------------------------------------------------------------------- compile
def _compiler_available() -> bool:
    try:
        fn = torch.compile(lambda t: t * 2 + 1, backend="inductor")
        return bool(torch.equal(fn(torch.ones(2)), torch.full((2,), 3.0)))
    except Exception:  # no C compiler, unsupported Python: skip rather than fail
        return False


@pytest.mark.slow
def test_compiled_nets_and_pgd_training_step_match_eager():
    if not _compiler_available():
        pytest.skip("torch.compile (inductor) is not available here")
    torch.manual_seed(0)
    net = SmallCNN(in_channels=3, num_classes=10, input_size=8)
    x, y = _rgb_batch()
    compiled = torch.compile(net)
    net.eval()
    assert torch.allclose(compiled(x), net(x), atol=1e-5)

    # One Madry step: PGD on the compiled net, then a gradient step; same weights as the eager step.
    attack = PGD(eps=8 / 255, alpha=2 / 255, steps=2, random_start=False)

    def train_step(model: nn.Module) -> torch.Tensor:
        x_adv = attack(model, x, y)
        loss = nn.functional.cross_entropy(model(x_adv), y)
        loss.backward()
        return loss.detach()

    eager_net = SmallCNN(in_channels=3, num_classes=10, input_size=8)
    eager_net.load_state_dict(net.state_dict())
    eager_net.train()
    net.train()
    loss_c = train_step(compiled)
    loss_e = train_step(eager_net)
    assert torch.allclose(loss_c, loss_e, atol=1e-5)
    for pc, pe in zip(net.parameters(), eager_net.parameters()):
        assert torch.allclose(pc.grad, pe.grad, atol=1e-5)
