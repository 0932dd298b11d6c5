"""Adapter for stock ``transformers`` Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

What this family looks like to the methods (all read from the config, ``image_grid_thw`` and the
processor's rules; ``docs/qwen.md`` has the whole story, ``docs/qwen-notes.md`` the stock call chain):

* **tokens**: native dynamic resolution. The processor resizes an image (``smart_resize``, multiples of
  ``patch_size * spatial_merge_size`` between its ``min_pixels`` and ``max_pixels``) and cuts it into
  ``patch_size`` patches (``image_grid_thw = (1, h, w)``); the ViT attends in windows of
  ``window_size / patch_size / spatial_merge_size`` merged cells per side except in its
  ``fullatt_block_indexes`` blocks, and the merger turns each ``m x m`` group of patches into one LLM token:
  ``H x W = (h / m) x (w / m)`` tokens in raster order, no [CLS], no thumbnail, no newlines.
* **positions**: M-RoPE (t, h, w) from ``get_rope_index``; every kept token keeps its stock position and the
  text after an image keeps stock's (``qwen_common.pack_qwen`` / ``packed_lm_inputs``).
* **scores**: ``scorer="auto"`` is ``"attention_received"``: the attention each patch receives in the scoring
  block (the last by default), recomputed from the block's input with its own fused ``qkv`` and 2-D rotary,
  relative to uniform attention over its segment (its window in a windowed block, the image in a
  full-attention one), averaged over a token's ``m x m`` patches.
* **the methods' context**: a global view (the token map adaptive-average-pooled to S x S) and a grid of
  rectangular regions playing the crops (``qwen_common.RegionLayout``); nothing of the global view is
  emitted; kept tokens reach the LLM in stock raster order.

The authors' Qwen2.5-VL code is followed where it exists: DART (``topk_rule="qwen2_5_vl"``, their in-LLM
rule) and DivPrune (the community port their README links: ``space="tower"``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import qwen_common
from .qwen_common import QwenAdapter, RegionLayout, resize_rule, unsupported

FAMILY = "qwen2_5_vl"
SUPPORTED_CLASSES = ("Qwen2_5_VLForConditionalGeneration",)
CONFIG_CLASSES = ("Qwen2_5_VLConfig",)
DISPLAY = "Qwen2.5-VL"
TOWER = "Qwen2.5-VL's ViT (window attention, no [CLS] token)"


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def check_config(cfg) -> None:
    """Raise a clear error unless ``cfg`` (a ``Qwen2_5_VLConfig``) describes a model this adapter supports."""
    qwen_common.check_config(cfg)


def check_model(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` is a stock Qwen2.5-VL whose tower and merger this adapter can drive."""
    qwen_common.check_tower(model, SUPPORTED_CLASSES, TOWER, ("ln_q", "mlp"))


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def layout(config, image_size: tuple[int, int], processor) -> RegionLayout:
    """The region layout of an image of (height, width) as ``processor`` resizes it."""
    return RegionLayout.of(resize_rule(processor, config, DISPLAY).merged(image_size))


# --------------------------------------------------------------------------------------------
# Vision side
# --------------------------------------------------------------------------------------------


def project_rows(model: nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, None]:
    """(M, D_llm): vision-space rows (M, m^2 D_vis) — a merged token's patches of the last block, concatenated —
    through the model's merger (``ln_q`` per patch, then the MLP), as the tower turns its own groups into tokens."""
    merger = model.model.visual.merger
    return merger(rows.reshape(-1, rows.shape[-1] // model.config.vision_config.spatial_merge_size**2)), None


#: ``compress(model, cfg, pixel_values, image_sizes=None, input_ids=None, attention_mask=None, **vision_kwargs)``
compress = qwen_common.family_compress(lambda: ADAPTER)


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


class Qwen2_5_VLAdapter(QwenAdapter):
    """Qwen2.5-VL: windowed ViT with full-attention blocks, 2 x 2 merger, M-RoPE Qwen2 LM."""

    family = FAMILY
    display_name = DISPLAY
    model_classes = SUPPORTED_CLASSES
    config_classes = CONFIG_CLASSES
    tower_name = TOWER
    unsupported_methods = unsupported(DISPLAY)
    checkpoints = ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-72B-Instruct")

    check_config = staticmethod(check_config)
    check_model = staticmethod(check_model)
    compress_images = staticmethod(compress)
    project_rows = staticmethod(project_rows)


ADAPTER = Qwen2_5_VLAdapter()
