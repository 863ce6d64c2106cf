"""Argument checks shared by every constructor and function.

Each check raises one ``ValueError`` (or ``TypeError``) whose message names the argument, says what was
expected and shows the value received, e.g. ``batch_size must be a positive integer, got -3``. Keeping
the wording in one place keeps the error messages of the whole library uniform.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import torch

__all__ = [
    "check_choice",
    "check_finite",
    "check_fraction",
    "check_image_range",
    "check_non_negative",
    "check_positive",
    "check_positive_int",
    "check_probability_vector",
    "check_same_length",
    "check_seed",
]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive(name: str, value: Any) -> float:
    """Return ``value`` if it is a finite number > 0, else raise ``ValueError`` naming ``name``."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


def check_non_negative(name: str, value: Any) -> float:
    """Return ``value`` if it is a finite number >= 0, else raise ``ValueError`` naming ``name``."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return value


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer >= ``minimum``, else raise ``ValueError`` naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_seed(name: str, value: Any) -> int:
    """Return ``value`` if it is a usable random seed (an integer in ``[0, 2**63)``), else raise naming ``name``.

    Negative seeds are refused: NumPy's generators reject them, and ``torch.Generator.manual_seed`` maps them
    onto other seeds, so a negative seed would silently alias a positive one.
    """
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise ValueError(f"{name} must be an integer seed in [0, 2**63), got {value!r}")
    return value


def check_fraction(name: str, value: Any, *, inclusive_low: bool = True, inclusive_high: bool = False) -> float:
    """Return ``value`` if it lies in the unit interval (bounds as stated), else raise naming ``name``."""
    lo_ok = _is_number(value) and (value >= 0 if inclusive_low else value > 0)
    hi_ok = _is_number(value) and (value <= 1 if inclusive_high else value < 1)
    if not (lo_ok and hi_ok):
        lo = "[" if inclusive_low else "("
        hi = "]" if inclusive_high else ")"
        raise ValueError(f"{name} must lie in {lo}0, 1{hi}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(map(repr, choices))}, got {value!r}")
    return value


def check_probability_vector(name: str, value: Sequence[float] | torch.Tensor, atol: float = 1e-6) -> torch.Tensor:
    """Return ``value`` as a float64 tensor if it is non-negative and sums to one, else raise."""
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.ndim != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of proportions, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"{name} must be non-negative and finite, got {t.tolist()}")
    if abs(float(t.sum()) - 1.0) > atol:
        raise ValueError(f"{name} must sum to one, got sum {float(t.sum()):.6g} for {t.tolist()}")
    return t


def check_same_length(name_a: str, a: Any, name_b: str, b: Any) -> int:
    """Return the common length of ``a`` and ``b`` or raise ``ValueError`` naming both."""
    la, lb = len(a), len(b)
    if la != lb:
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {la} and {lb}")
    return la


def check_image_range(name: str, x: torch.Tensor, low: float = 0.0, high: float = 1.0, tol: float = 1e-6) -> None:
    """Raise ``ValueError`` unless every element of the float tensor ``x`` lies in ``[low, high]``."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if torch.is_tensor(x) else ""))
    if x.numel() == 0:
        return
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < low - tol or hi > high + tol:
        raise ValueError(f"{name} must lie in [{low}, {high}] (images are pixels in [0, 1]), "
                         f"got values in [{lo:.4g}, {hi:.4g}]")


def check_finite(name: str, value: Any, *, allow_posinf: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` if the tensor ``value`` holds NaN or +-inf.

    ``value`` may also be a sequence of tensors (checked element by element, the error naming
    ``name[i]``) or anything else (``None``, numbers, integer or boolean tensors), which passes: those
    cannot hold NaN, and their other properties are checked where they are used. With ``allow_posinf``,
    ``+inf`` is accepted (a constraint that never binds, an unbounded certified radius); NaN and ``-inf``
    are not.

    Every public function of the pure packages and every metric calls this on its floating-point tensor
    arguments: NaN propagates silently through gradients, sorting and comparisons (a NaN image got a
    certified top-k overlap of 6), so refusing it at the door is the only place the error can name its
    source.
    """
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite(f"{name}[{i}]", item, allow_posinf=allow_posinf)
        return
    if not torch.is_tensor(value) or not (value.is_floating_point() or value.is_complex()) or value.numel() == 0:
        return
    v = value.detach()
    if allow_posinf:
        if bool((torch.isnan(v) | (v == -math.inf)).any()):
            raise ValueError(f"{name} contains NaN or -inf; expected finite values (or +inf)")
    elif not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or inf; expected finite values")
