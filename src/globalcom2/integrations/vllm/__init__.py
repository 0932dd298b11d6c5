"""vLLM plugin: serve LLaVA-NeXT with compressed visual tokens through stock vLLM.

vLLM loads ``register`` from the ``vllm.general_plugins`` entry point in every process. It registers
``GlobalCom2LlavaNextForConditionalGeneration``; a model opts in with

    vllm serve PATH --hf-overrides '{"architectures": ["GlobalCom2LlavaNextForConditionalGeneration"],
                                     "globalcom2": {"method": "globalcom2", "retention_ratio": 0.25}}'

This module imports nothing from vLLM until ``register`` runs, and the model class is registered
lazily (by its import path), so loading the plugin costs nothing in processes that never build it.
"""

from __future__ import annotations

from .checkpoint import save_llava_hf_checkpoint, save_vllm_checkpoint
from .options import ARCHITECTURE, method_config

__all__ = ["ARCHITECTURE", "register", "method_config", "save_llava_hf_checkpoint", "save_vllm_checkpoint"]

_MODEL_PATH = "globalcom2.integrations.vllm.llava_next:GlobalCom2LlavaNextForConditionalGeneration"


def register() -> None:
    """Register the compressed LLaVA-NeXT architecture with vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, _MODEL_PATH)
