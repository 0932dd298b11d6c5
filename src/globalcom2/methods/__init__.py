"""Registry of compression methods: one name, one frozen config class.

A CLI flag, a benchmark and a test all say ``method="globalcom2"`` and get the same class.
"""

from __future__ import annotations

from typing import Any

from .ablations import TABLE_I, TABLE_IV_V, RandomConfig
from .base import (
    ImageContext,
    LLMMethod,
    MethodConfig,
    Requirements,
    Selection,
    ViewSelector,
    VisionMethod,
    check_concrete,
)
from .cdpruner import CDPrunerConfig
from .composed import ComposedConfig
from .dart import DARTConfig, DARTEmbeddingConfig
from .divprune import DivPruneConfig
from .fastervlm import FasterVLMConfig
from .fastv import FastVConfig
from .globalcom2 import GlobalCom2Config
from .sparsevlm import SparseVLMConfig
from .visionzip import VisionZipConfig

__all__ = [
    "ImageContext",
    "MethodConfig",
    "VisionMethod",
    "LLMMethod",
    "Requirements",
    "ViewSelector",
    "Selection",
    "GlobalCom2Config",
    "FasterVLMConfig",
    "FastVConfig",
    "SparseVLMConfig",
    "VisionZipConfig",
    "DivPruneConfig",
    "CDPrunerConfig",
    "DARTConfig",
    "DARTEmbeddingConfig",
    "ComposedConfig",
    "RandomConfig",
    "REGISTRY",
    "available_methods",
    "make_config",
]

_ALL = (GlobalCom2Config, FasterVLMConfig, FastVConfig, SparseVLMConfig, *TABLE_I, *TABLE_IV_V, RandomConfig)
_ALL += (VisionZipConfig, DivPruneConfig, DARTConfig, CDPrunerConfig)  # the newer methods beside GlobalCom²
_ALL += (ComposedConfig,)  # GlobalCom²'s crop budgets x any per-crop selector
REGISTRY: dict[str, type[MethodConfig]] = {cls.name: cls for cls in _ALL}


def available_methods() -> dict[str, str]:
    """Method names mapped to a one-line description."""
    return {name: cls.description for name, cls in REGISTRY.items()}


def make_config(method: str | MethodConfig = "globalcom2", **options: Any) -> MethodConfig:
    """Build a validated config from a method name and its options (or pass a config through).

    A method with several forms (DART's ``form="llm"`` / ``"embedding"``) gets the class of the form asked for.
    """
    if isinstance(method, MethodConfig):
        check_concrete(type(method))
        if not options:
            return method
        cls = _form_class(type(method), {**method.options(), **options})
        return cls(**{**method.options(), **_checked(cls, options)})
    if not isinstance(method, str) or method not in REGISTRY:
        raise ValueError(f"method must be one of ({', '.join(map(repr, REGISTRY))}), got {method!r}")
    cls = _form_class(REGISTRY[method], options)
    return cls(**_checked(cls, options))


def _form_class(cls: type[MethodConfig], options: dict[str, Any]) -> type[MethodConfig]:
    """The class of the form ``options["form"]`` asks for (DART), else ``cls``; the class validates the value."""
    form = options.get("form")
    if cls.forms and isinstance(form, str) and form in cls.forms:
        return cls.forms[form]
    return cls


def _checked(cls: type[MethodConfig], options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(cls.option_names()))
    if unknown == ["budget"] and cls.where == "llm":
        raise TypeError(
            f"method {cls.name!r} prunes inside the language model, where budget does not apply: every image "
            "enters it with its stock token count; budget is an option of the vision-side methods"
        )
    if unknown:
        raise TypeError(
            f"method {cls.name!r} does not take option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(cls.option_names())}"
        )
    return options
