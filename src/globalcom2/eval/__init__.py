"""Moved to ``globalcom2.integrations.lmms_eval``; this path keeps working with a DeprecationWarning."""

import warnings

from ..integrations.lmms_eval import CLASS_PATH, MODEL_NAME, manifest, register

warnings.warn(
    "globalcom2.eval moved to globalcom2.integrations.lmms_eval; import that instead (removed in 0.3)",
    DeprecationWarning,
    2,
)

__all__ = ["MODEL_NAME", "CLASS_PATH", "manifest", "register"]
