"""Accuracy evaluation through lmms-eval: the ``globalcom2`` model plugin (optional extra ``globalcom2[eval]``).

lmms-eval finds the plugin through the ``lmms_eval.models`` entry point, which names :func:`manifest`;
``lmms-eval --model globalcom2 --model_args pretrained=PATH,method=globalcom2,retention_ratio=0.25``
then runs a local LLaVA-NeXT checkpoint with that compression method. Importing this package does not
import lmms-eval; :func:`manifest` and :func:`register` do, when called.
"""

from __future__ import annotations

from typing import Any

MODEL_NAME = "globalcom2"
CLASS_PATH = "globalcom2.integrations.lmms_eval.plugin.GlobalCom2LlavaNext"

__all__ = ["MODEL_NAME", "CLASS_PATH", "manifest", "register"]


def manifest() -> Any:
    """The ``lmms_eval.models.registry_v2.ModelManifest`` that the entry point hands to lmms-eval."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)


def register() -> None:
    """Register the plugin in this process's lmms-eval registry (for a source tree without the entry point)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
