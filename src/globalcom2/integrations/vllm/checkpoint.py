"""Save a transformers LLaVA-NeXT in the weight layout llava-hf checkpoints use (what vLLM loads)."""

from __future__ import annotations

import copy
import os
from typing import Any

from torch import nn

# transformers >= 4.52 saves the CLIP tower as ``vision_tower.embeddings...``; the llava-hf checkpoints
# (and vLLM's loader) name it ``vision_tower.vision_model.embeddings...``.
_TOWER = "vision_tower."


def llava_hf_state_dict(model: nn.Module) -> dict[str, Any]:
    """The model's weights under llava-hf names (``vision_tower.vision_model.*``, ``language_model.model.*``)."""
    out = {}
    for name, tensor in model.state_dict().items():
        name = name.removeprefix("model.")
        if name.startswith(_TOWER) and not name.startswith(_TOWER + "vision_model."):
            name = _TOWER + "vision_model." + name[len(_TOWER) :]
        elif name.startswith("language_model.") and not name.startswith("language_model.model."):
            name = "language_model.model." + name[len("language_model.") :]
        elif name.startswith("lm_head."):
            name = "language_model." + name
        out[name] = tensor.detach().contiguous().clone()
    return out


def save_llava_hf_checkpoint(model: nn.Module, processor: Any, path: str | os.PathLike) -> str:
    """Write ``model`` (config, generation config, safetensors weights) and ``processor`` to ``path``.

    The weights get the names the llava-hf checkpoints use, so vLLM loads every vision layer (including
    the last one, whose [CLS] attention GlobalCom² reads). Returns the path as a string.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__.removeprefix("GlobalCom2")]  # what save_pretrained records
    config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    save_file(llava_hf_state_dict(model), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if processor is not None:
        processor.save_pretrained(path)
    return path
