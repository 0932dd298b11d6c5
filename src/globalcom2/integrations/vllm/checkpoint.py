"""Save tiny (or any) transformers models in the layout the released checkpoints use, which is what vLLM loads.

``save_pretrained`` (transformers 5.19 and 5.24 alike) writes every family in its hub layout except the
CLIP/SigLIP tower of the LLaVA families: it names it ``vision_tower.embeddings...`` where the llava-hf
checkpoints (and vLLM's ``CLIPVisionModel`` / ``SiglipVisionModel``) have ``vision_tower.vision_model.
embeddings...``; vLLM then stops with "There is no module or parameter named 'vision_tower.embeddings'".
InternVL (``vision_tower.encoder.layer.*``, ``language_model.model.*``), Qwen2.5-VL (``model.layers.*``,
``visual.*``) and Qwen3-VL (``model.language_model.*``, ``model.visual.*``) load as ``save_pretrained``
writes them.
"""

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


#: model classes whose weights need the llava-hf tower names
LLAVA_CLASSES = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
#: the stock video processor of each processor class (vLLM's processors load one; the tiny processors have none)
VIDEO_PROCESSORS = {
    "LlavaOnevisionProcessor": "LlavaOnevisionVideoProcessor",
    "InternVLProcessor": "InternVLVideoProcessor",
    "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
    "Qwen3VLProcessor": "Qwen3VLVideoProcessor",
}


def _stock_class(obj: Any) -> type:
    """The first class in ``type(obj)``'s MRO that transformers defines (the tiny processors subclass one)."""
    return next(c for c in type(obj).__mro__ if c.__module__.startswith("transformers."))


def save_processor(processor: Any, path: str) -> None:
    """``processor.save_pretrained(path)``, recorded under its stock class, with the stock video processor
    the tiny processors leave out when that can be built (it needs torchvision, which vLLM installs)."""
    import json

    import transformers

    processor = copy.copy(processor)
    stock = _stock_class(processor)
    video = VIDEO_PROCESSORS.get(stock.__name__)
    if video is not None and getattr(processor, "video_processor", None) is None:
        try:
            processor.video_processor = getattr(transformers, video)()
        except ImportError:  # no torchvision: save the parts vLLM's image path reads
            processor.tokenizer.save_pretrained(path)
            processor.image_processor.save_pretrained(path)
            return
    processor.save_pretrained(path)
    cfg_path = os.path.join(path, "processor_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["processor_class"] = stock.__name__
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)


def save_vllm_checkpoint(model: nn.Module, processor: Any, path: str | os.PathLike) -> str:
    """Write ``model`` and ``processor`` to ``path`` so that stock vLLM loads them (any supported family).

    LLaVA-NeXT and LLaVA-OneVision get the llava-hf weight names (``save_llava_hf_checkpoint``); InternVL,
    Qwen2.5-VL and Qwen3-VL are saved by ``save_pretrained``. Returns the path as a string.
    """
    path = os.fspath(path)
    if type(model).__name__.removeprefix("GlobalCom2") in LLAVA_CLASSES:
        save_llava_hf_checkpoint(model, None, path)
    else:
        model.save_pretrained(path)
    if processor is not None:
        save_processor(processor, path)
    return path


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
        save_processor(processor, path)
    return path
