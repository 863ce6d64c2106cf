"""The test run turns the library's own warnings into errors (pyproject's ``filterwarnings``).

These tests pin down how that filter behaves, so that a new warning from lightning_robust fails the suite and
a test that expects one has to say so with ``pytest.warns``.
"""

from __future__ import annotations

import warnings

import pytest

from lightning_robust.ot.sinkhorn import SinkhornConvergenceWarning


def _warn_from(module_name: str, code: str) -> None:
    """Run ``code`` as if it were a module called ``module_name`` (warnings attribute it by ``__name__``)."""
    exec(compile(code, f"<{module_name}>", "exec"), {"__name__": module_name})


def test_a_warning_issued_in_the_library_is_an_error():
    with pytest.raises(UserWarning, match="probe"):
        _warn_from("lightning_robust.models._probe", "import warnings\nwarnings.warn('probe')")
    with pytest.raises(DeprecationWarning, match="probe"):  # any category
        _warn_from("lightning_robust._probe", "import warnings\nwarnings.warn('probe', DeprecationWarning)")


def test_rank_zero_warn_called_from_the_library_is_an_error():
    # Lightning's rank_zero_warn uses stacklevel=4: the warning is attributed to the library frame calling it.
    code = "from pytorch_lightning.utilities import rank_zero_warn\nrank_zero_warn('probe')"
    with pytest.raises(UserWarning, match="probe"):
        _warn_from("lightning_robust.callbacks._probe", code)


def test_warnings_attributed_elsewhere_are_left_to_the_other_filters():
    # stacklevel=2 names the caller: called from a test module, the module filter does not apply ...
    code = "import warnings\ndef f():\n    warnings.warn('probe', stacklevel=2)\n"
    namespace: dict = {"__name__": "lightning_robust._probe"}
    exec(compile(code, "<lightning_robust._probe>", "exec"), namespace)
    with warnings.catch_warnings(record=True) as record:
        namespace["f"]()
    assert [str(w.message) for w in record] == ["probe"]
    # ... called from library code, it does.
    caller = {"__name__": "lightning_robust.ot._caller", "f": namespace["f"]}
    with pytest.raises(UserWarning, match="probe"):
        exec(compile("f()", "<lightning_robust.ot._caller>", "exec"), caller)


def test_the_librarys_warning_classes_are_errors_wherever_they_are_attributed():
    with pytest.raises(SinkhornConvergenceWarning):
        warnings.warn("probe", SinkhornConvergenceWarning, stacklevel=1)  # attributed to this test module


def test_pytest_warns_still_captures_an_expected_library_warning():
    with pytest.warns(UserWarning, match="expected"):
        _warn_from("lightning_robust._probe", "import warnings\nwarnings.warn('expected')")
