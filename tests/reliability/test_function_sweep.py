"""Every public function of the pure packages (attacks, certify, ot, interpret, defenses) rejects a bad
numeric argument with an error naming it.

Each function is called once with valid tiny inputs (``function_recipes``), then with one numeric argument
replaced by NaN, a string, or -1 (when its default is non-negative): each must raise ``ValueError`` /
``TypeError`` naming that argument. Context managers are entered, since they validate on entry.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import pytest

from tests.reliability.function_recipes import RECIPES

PACKAGES = ("attacks", "certify", "ot", "interpret", "defenses")

# Functions with numeric arguments that the sweep does not call, with the reason.
NOT_SWEPT = {
    "nearest_to_target": "needs a feature extractor and candidate images (tests/attacks/test_poisons.py)",
    "assign_to_generators": "optimises latent codes of several generators (tests/ot/test_two_sample_and_mixtures.py)",
    "entropic_log_likelihood": "needs a trained generator and critics (tests/ot/test_likelihood.py)",
    "estimate_normalized_wasserstein": "trains a critic (tests/ot/test_normalized_wasserstein.py)",
    "fit_fake_potential": "needs a generator (tests/ot/test_likelihood.py)",
    "caso_solve": "takes a gradient and a Hessian-vector product (tests/interpret/test_second_order.py)",
    "as_attack": "takes an attack object; its bad arguments are tested in tests/attacks/test_foreign.py",
    "check_adversarial_output": "refuses a bad x_adv by naming the attack, not the argument, with "
                                "ForeignAttackError (each check: tests/attacks/test_foreign.py)",
}


def _numeric_functions() -> list[tuple[str, Callable[..., Any]]]:
    out = []
    for pkg in PACKAGES:
        mod = importlib.import_module(f"lightning_robust.{pkg}")
        for name in mod.__all__:
            fn = getattr(mod, name)
            if inspect.isfunction(fn) and any(_numeric(p) for p in inspect.signature(fn).parameters.values()):
                out.append((name, fn))
    return out


def _numeric(p: inspect.Parameter) -> bool:
    return isinstance(p.default, (int, float)) and not isinstance(p.default, bool)


def _call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    result = fn(**kwargs)
    if hasattr(result, "__enter__"):
        with result:
            pass


FUNCTIONS = _numeric_functions()
SWEPT = [(n, f) for n, f in FUNCTIONS if n not in NOT_SWEPT]


def test_every_numeric_function_has_a_recipe_or_a_reason():
    names = {n for n, _ in FUNCTIONS}
    assert set(NOT_SWEPT) <= names, f"stale entries: {sorted(set(NOT_SWEPT) - names)}"
    assert {n for n, _ in SWEPT} <= set(RECIPES), f"no recipe: {sorted({n for n, _ in SWEPT} - set(RECIPES))}"


@pytest.mark.parametrize(("name", "fn"), SWEPT, ids=[n for n, _ in SWEPT])
def test_bad_numeric_arguments_are_named(name, fn):
    base = RECIPES[name]()
    _call(fn, base)  # the valid call works
    for p in inspect.signature(fn).parameters.values():
        if not _numeric(p) or p.name in base:
            continue
        bad_values: list[Any] = [float("nan"), "oops"] + ([-1 if isinstance(p.default, int) else -1.0]
                                                          if p.default >= 0 else [])
        for bad in bad_values:
            with pytest.raises((ValueError, TypeError)) as info:
                _call(fn, {**RECIPES[name](), p.name: bad})
            assert p.name in str(info.value), f"{name}({p.name}={bad!r}): {info.value}"
