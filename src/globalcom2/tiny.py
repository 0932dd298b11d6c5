"""Moved to ``globalcom2.testing``; this path keeps working with a DeprecationWarning (removed in 0.3).

A small shim rather than a module alias: its ``demo_image(width, height, seed)`` keeps the old positional
order, where ``globalcom2.testing.demo_image(*, height, width, seed)`` takes keywords only.
"""

from __future__ import annotations

import warnings

from .testing import tiny as _tiny
from .testing.tiny import (  # noqa: F401  (the old module's names)
    DEMO_SHAPE,
    SPECIALS,
    WORDS,
    pil_image_processor_class,
    tiny_config,
    tiny_model,
    tiny_processor,
    tiny_tokenizer,
)

warnings.warn(
    "globalcom2.tiny moved to globalcom2.testing; import that instead (globalcom2.tiny is removed in 0.3)",
    DeprecationWarning,
    2,
)


def demo_image(width: int = 300, height: int = 220, seed: int = 0):
    """Deprecated: ``globalcom2.testing.demo_image(height=..., width=..., seed=...)`` (keywords, height first)."""
    warnings.warn(
        "globalcom2.tiny.demo_image(width, height) is deprecated: use "
        f"globalcom2.testing.demo_image(height={height}, width={width}) (keyword-only)",
        DeprecationWarning,
        2,
    )
    return _tiny.demo_image(height=height, width=width, seed=seed)
