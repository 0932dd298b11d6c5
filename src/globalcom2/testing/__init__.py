"""Offline stand-ins for tests, demos and benchmarks: tiny random-weight models of every supported family,
processors and tokenizers built in memory, and generated test images. Nothing here downloads anything.

>>> from globalcom2.testing import demo_image, tiny_model, tiny_processor
>>> image = demo_image(height=220, width=300)   # keywords: (height, width), as transformers' image_sizes
"""

from . import tiny_qwen
from .tiny import DEMO_SHAPE, demo_image, tiny_config, tiny_model, tiny_processor, tiny_tokenizer
from .tiny_internvl import tiny_internvl_config, tiny_internvl_model, tiny_internvl_processor
from .tiny_onevision import tiny_onevision_config, tiny_onevision_model, tiny_onevision_processor
from .tiny_qwen import *  # noqa: F403  (its __all__: tiny Qwen-VL models, processors, real shapes)
from .tiny_qwen import tiny_qwen2_5_vl_model, tiny_qwen2_5_vl_processor, tiny_qwen3_vl_model, tiny_qwen3_vl_processor


def _demo_llava_next():
    shape = DEMO_SHAPE
    return tiny_model(**shape), tiny_processor(image_size=shape["image_size"], patch_size=shape["patch_size"])


def _demo_llava_onevision():
    return tiny_onevision_model(text_layers=4), tiny_onevision_processor()


def _demo_internvl():
    return tiny_internvl_model(text_layers=4), tiny_internvl_processor()


def _demo_qwen2_5_vl():
    return tiny_qwen2_5_vl_model(text_layers=4), tiny_qwen2_5_vl_processor()


def _demo_qwen3_vl():
    return tiny_qwen3_vl_model(text_layers=4), tiny_qwen3_vl_processor()


#: per family (``FamilyAdapter.family``): () -> (tiny random-weight model, its processor), for demos and tools
#: (``globalcom2 demo/viz/bench --family``); 4 language-model layers each, so that every registered method
#: runs (SparseVLM with ``layers=(0, 1, 2)``). A new family adds its entry here
DEMO_MODELS = {
    "llava_next": _demo_llava_next,
    "llava_onevision": _demo_llava_onevision,
    "internvl": _demo_internvl,
    "qwen2_5_vl": _demo_qwen2_5_vl,
    "qwen3_vl": _demo_qwen3_vl,
}

__all__ = [
    "DEMO_MODELS",
    "DEMO_SHAPE",
    "demo_image",
    "tiny_config",
    "tiny_model",
    "tiny_processor",
    "tiny_tokenizer",
    "tiny_internvl_config",
    "tiny_internvl_model",
    "tiny_internvl_processor",
    "tiny_onevision_config",
    "tiny_onevision_model",
    "tiny_onevision_processor",
    *tiny_qwen.__all__,
]
