"""Old import paths of modules that moved, kept working with a DeprecationWarning (removed in 0.3)."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make ``import old`` give the module ``new`` itself (same object: attributes, monkeypatching), warning once."""
    warnings.warn(f"{old} moved to {new}; import {new} instead ({old} is removed in 0.3)", DeprecationWarning, 3)
    sys.modules[old] = importlib.import_module(new)
