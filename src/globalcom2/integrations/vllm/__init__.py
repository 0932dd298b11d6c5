"""vLLM plugin: serve LLaVA-NeXT, LLaVA-OneVision, InternVL, Qwen2.5-VL and Qwen3-VL with compressed visual
tokens through stock vLLM.

vLLM loads ``register`` from the ``vllm.general_plugins`` entry point in every process. It registers
``GlobalCom2LlavaNextForConditionalGeneration``, ``GlobalCom2LlavaOnevisionForConditionalGeneration`` and
``GlobalCom2InternVLForConditionalGeneration`` (HF-native InternVL, which vLLM serves as
``InternS1ForConditionalGeneration``), ``GlobalCom2Qwen2_5_VLForConditionalGeneration`` and
``GlobalCom2Qwen3VLForConditionalGeneration``; a model opts in with

    vllm serve PATH --hf-overrides '{"architectures": ["GlobalCom2LlavaNextForConditionalGeneration"],
                                     "globalcom2": {"method": "globalcom2", "retention_ratio": 0.25}}'

This module imports nothing from vLLM until ``register`` runs, and the model class is registered
lazily (by its import path), so loading the plugin costs nothing in processes that never build it.
"""

from __future__ import annotations

from .checkpoint import save_llava_hf_checkpoint, save_vllm_checkpoint
from .options import ARCHITECTURE, method_config

__all__ = [
    "ARCHITECTURE",
    "ARCHITECTURES",
    "register",
    "method_config",
    "save_llava_hf_checkpoint",
    "save_vllm_checkpoint",
]

#: the compressed architectures, by name, and where their classes live (imported by vLLM when a model uses one)
ARCHITECTURES = {
    ARCHITECTURE: "globalcom2.integrations.vllm.llava_next:GlobalCom2LlavaNextForConditionalGeneration",
    "GlobalCom2LlavaOnevisionForConditionalGeneration": (
        "globalcom2.integrations.vllm.llava_onevision:GlobalCom2LlavaOnevisionForConditionalGeneration"
    ),
    "GlobalCom2InternVLForConditionalGeneration": (
        "globalcom2.integrations.vllm.internvl:GlobalCom2InternVLForConditionalGeneration"
    ),
    "GlobalCom2Qwen2_5_VLForConditionalGeneration": (
        "globalcom2.integrations.vllm.qwen:GlobalCom2Qwen2_5_VLForConditionalGeneration"
    ),
    "GlobalCom2Qwen3VLForConditionalGeneration": (
        "globalcom2.integrations.vllm.qwen:GlobalCom2Qwen3VLForConditionalGeneration"
    ),
}


def register() -> None:
    """Register the compressed architectures with vLLM's model registry (idempotent)."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for name, path in ARCHITECTURES.items():
        if name not in supported:
            ModelRegistry.register_model(name, path)
