"""Validation of method options: errors that name the option and the allowed values."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from ..core import scoring


def _fmt(values) -> str:
    return ", ".join(repr(v) for v in values)


def check_scorer(value: Any) -> None:
    """Raise ValueError naming ``scorer`` unless ``value`` is one of ``core.scoring.SCORER_CHOICES``."""
    check_choice("scorer", value, scoring.SCORER_CHOICES)


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of ({_fmt(allowed)}), got {value!r}")


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number: any ``numbers.Real`` (int, float, NumPy scalars such as
    ``np.float32``, ``Fraction``) or a 0-d real-valued tensor/array, but not a bool."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and (
            value.dtype.is_floating_point or not (value.dtype.is_complex or value.dtype == torch.bool)
        )
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and value.dtype.kind in "iuf"
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_number(
    name: str, value: Any, low: float, high: float, low_open: bool = True, high_open: bool = False
) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a finite real number in the interval."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    interval = f"{lo}{low}, {high}{hi}"
    if not is_real(value):
        raise TypeError(f"{name} must be a real number in {interval}, got {value!r}")
    v = float(value)
    ok = math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
