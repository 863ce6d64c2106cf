"""Every public class of models / callbacks / datamodules / attacks / metrics / nets rejects bad numeric
arguments with an error that names the argument.

For each class the sweep builds a valid instance (required arguments from ``argument_recipes``), then for
every numeric argument with a default it tries NaN, a string and -1 (when the default is non-negative):
each must raise ``ValueError`` / ``TypeError`` naming that argument. Classes the sweep cannot build
(abstract bases, datasets over user tensors) are listed explicitly, so a new class without a recipe fails
the test until it gets one.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

from tests.reliability.argument_recipes import required_value

PACKAGES = ("models", "callbacks", "datamodules", "attacks", "metrics", "nets", "objectives")

# Classes built elsewhere in the tests (abstract bases; wrappers over user datasets/tensors; classes whose
# required arguments must agree with each other), with the reason they are not swept.
NOT_SWEPT = {
    "attacks.Attack": "abstract",
    "attacks.FunctionalAttack": "abstract",
    "attacks.Perturbation": "abstract",
    "attacks.PoisonAttack": "abstract",
    "attacks.TextAttack": "abstract",
    "attacks.TextAttackResult": "a result record",
    "attacks.Compose": "takes a list of perturbations (tests/attacks)",
    "attacks.LayerFeatures": "needs a net and a matching layer name (tests/attacks/test_poisons.py)",
    "callbacks.GANEvaluation": "needs a feature net (tests/callbacks/test_gan_callbacks.py)",
    "datamodules.DatasetDataModule": "wraps user datasets (tests/callbacks/test_poison_filter.py)",
    "datamodules.FilteredDataset": "wraps a user dataset",
    "datamodules.LoaderOptions": "the TypedDict of the loader settings (swept through every DataModule)",
    "datamodules.ImageFileDataset": "wraps a list of files",
    "datamodules.IndexedDataset": "wraps a user dataset",
    "datamodules.PoisonSwapDataset": "wraps a user dataset",
    "datamodules.TensorImageDataset": "wraps user tensors",
    "datamodules.TokenizedTextDataset": "wraps user texts",
    "datamodules.VisionDataModule": "abstract base of the vision DataModules (each is swept)",
    "datamodules.PoisonedDataModule": "needs poisons or an attack with a feature net (tests/datamodules)",
    "metrics.ClassifierFeatures": "needs a net with the named layer (tests/metrics/test_image_quality.py)",
    "models.NWDomainAdaptation": "needs matching feature / critic widths (tests/models)",
    "nets.DualCritic": "takes two critic nets",
    "nets.LinearProbe": "needs a net and its head's name",
    "nets.Normalize": "takes per-channel mean and std",
    "objectives.Objective": "abstract",
    "objectives.TrainingBatch": "a per-step record of tensors",
    "objectives.TextAdversarialTraining": "needs a TextAttack (tests/objectives, tests/models/test_text_classifier.py)",
}
# Numeric arguments for which a negative value is legitimate.
NEGATIVE_OK = {"low"}  # value bounds of the threat model: inputs may live in [-1, 1]


def _public_classes() -> list[tuple[str, type]]:
    out = []
    for pkg in PACKAGES:
        mod = importlib.import_module(f"lightning_robust.{pkg}")
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) and not issubclass(obj, BaseException):
                out.append((f"{pkg}.{name}", obj))
    return out


def _build_args(qual: str, cls: type, tmp: str) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not inspect.Parameter.empty:
            continue
        args[p.name] = required_value(p.name, qual.split(".")[1], tmp)
    return args


def _defaults(cls: type) -> list[tuple[str, Any]]:
    """``(name, default)`` of the constructor's arguments; ``**loader: Unpack[LoaderOptions]`` counts as its nine."""
    from lightning_robust.datamodules.base import LOADER_DEFAULTS

    out: list[tuple[str, Any]] = []
    for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if p.kind == p.VAR_KEYWORD and "LoaderOptions" in str(p.annotation):
            out += list({**LOADER_DEFAULTS, **getattr(cls, "loader_defaults", {})}.items())
        elif p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            out.append((p.name, p.default))
    return out


def _bad_values(default: Any) -> list[Any]:
    bad: list[Any] = [float("nan"), "oops"]
    if default >= 0:
        bad.append(-1 if isinstance(default, int) else -1.0)
    return bad


CLASSES = _public_classes()


def test_every_public_class_is_swept_or_listed():
    names = {q for q, _ in CLASSES}
    assert set(NOT_SWEPT) <= names, f"stale entries: {sorted(set(NOT_SWEPT) - names)}"


SWEPT = [c for c in CLASSES if c[0] not in NOT_SWEPT]


@pytest.mark.parametrize(("qual", "cls"), SWEPT, ids=[q for q, _ in SWEPT])
def test_numeric_arguments_reject_bad_values_naming_the_argument(tmp_path, qual, cls):
    base = _build_args(qual, cls, str(tmp_path))
    cls(**base)  # the valid baseline builds
    tried = 0
    for name, default in _defaults(cls):
        if default is inspect.Parameter.empty or isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        for bad in _bad_values(default):
            if bad == -1 and name in NEGATIVE_OK:
                continue
            tried += 1
            with pytest.raises((ValueError, TypeError)) as info:
                cls(**{**base, name: bad})
            assert name in str(info.value), f"{qual}({name}={bad!r}): error does not name it: {info.value}"
