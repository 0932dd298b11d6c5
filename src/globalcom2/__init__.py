"""globalcom2: training-free visual-token compression for AnyRes multimodal LLMs.

>>> import globalcom2
>>> globalcom2.apply(model, retention_ratio=0.25)   # patches this instance only
>>> globalcom2.remove(model)                         # stock model again

The names below are imported on first use (PEP 562), so ``import globalcom2`` and the ``globalcom2``
command's ``--help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule that defines it
_EXPORTS = {
    "apply": "patch",
    "remove": "patch",
    "is_patched": "patch",
    "get_config": "patch",
    "available_methods": "methods",
    "make_config": "methods",
    "GlobalCom2Config": "methods",
    "MethodConfig": "methods",
    "num_image_tokens": "budget",
}
_SUBMODULES = ("budget", "core", "integrations", "methods", "models", "patch", "testing", "tools")

__all__ = [
    "apply",
    "remove",
    "is_patched",
    "get_config",
    "available_methods",
    "make_config",
    "num_image_tokens",
    "GlobalCom2Config",
    "MethodConfig",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .budget import num_image_tokens
    from .methods import GlobalCom2Config, MethodConfig, available_methods, make_config
    from .patch import apply, get_config, is_patched, remove


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'globalcom2' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, *_SUBMODULES})
