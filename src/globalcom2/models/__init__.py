"""Model adapters: one file per model family, and the lookup that picks one for a model or config.

Every family is a ``FamilyAdapter`` subclass (``models/base.py`` declares each member with its default)
in its own file, which reads top to bottom: validation, geometry, vision side, the adapter class.
Adding a family is one adapter file, its tests, and one entry in ``FAMILIES`` below.
"""

from __future__ import annotations

from typing import Any

from . import internvl, llava_next, llava_onevision, qwen2_5_vl, qwen3_vl
from .base import FamilyAdapter, ImageBatch, ImageRecord

__all__ = [
    "FAMILIES",
    "FamilyAdapter",
    "ImageBatch",
    "ImageRecord",
    "adapter_for",
    "family_names",
    "internvl",
    "llava_next",
    "llava_onevision",
    "qwen2_5_vl",
    "qwen3_vl",
]

#: every family's adapter, in the order ``adapter_for`` tries them
FAMILIES: tuple[FamilyAdapter, ...] = (
    llava_next.ADAPTER,
    llava_onevision.ADAPTER,
    internvl.ADAPTER,
    qwen2_5_vl.ADAPTER,
    qwen3_vl.ADAPTER,
)


def family_names() -> tuple[str, ...]:
    """The supported families' short names."""
    return tuple(a.family for a in FAMILIES)


def _supported() -> str:
    return ", ".join(c for a in FAMILIES for c in a.model_classes)


def adapter_for(model_or_config: Any, argument: str = "model") -> FamilyAdapter:
    """The adapter for a model instance or its config; TypeError naming the supported classes otherwise."""
    names = {c.__name__ for c in type(model_or_config).__mro__}
    for adapter in FAMILIES:
        if names.intersection(adapter.model_classes) or names.intersection(adapter.config_classes):
            return adapter
    configs = ", ".join(c for a in FAMILIES for c in a.config_classes)
    raise TypeError(
        f"{argument} must be one of ({_supported()}) from transformers (or, where a config is accepted, one "
        f"of ({configs})); got {type(model_or_config).__name__}"
    )
