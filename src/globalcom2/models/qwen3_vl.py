"""Adapter for stock ``transformers`` Qwen3-VL (``Qwen3VLForConditionalGeneration``).

Qwen3-VL reads like Qwen2.5-VL (``models/qwen2_5_vl.py``): native dynamic resolution from
``image_grid_thw`` and the processor's ``smart_resize``, an ``m x m`` spatial merge into raster-ordered LLM
tokens, no [CLS], no thumbnail, M-RoPE (interleaved) positions. What differs:

* the ViT attends over the whole image in every block (no windows) and adds a learned position table;
* **DeepStack**: the outputs of the ``deepstack_visual_indexes`` blocks go through their own mergers and are
  *added* to the hidden states of the first LM layers at the visual slots. They are pruned consistently with
  the main sequence: a vision-side method hands the LM exactly the kept tokens' DeepStack rows (a VisionZip
  contextual token gets its merge of the DeepStack blocks too), and inside the LM the in-LLM methods' pruning
  carries them (``models/llm_pruning.py``): after the pruning layer only the surviving visual tokens get theirs.

No author of a compression method released Qwen3-VL code; the methods run as on Qwen2.5-VL, with the authors'
Qwen2.5-VL rules where those exist (DART's ``topk_rule``, DivPrune's port). ``docs/qwen.md``.
"""

from __future__ import annotations

import torch
from torch import nn

from . import qwen_common
from .qwen_common import QwenAdapter, RegionLayout, resize_rule, unsupported

FAMILY = "qwen3_vl"
SUPPORTED_CLASSES = ("Qwen3VLForConditionalGeneration",)
CONFIG_CLASSES = ("Qwen3VLConfig",)
DISPLAY = "Qwen3-VL"
TOWER = "Qwen3-VL's ViT (DeepStack, no [CLS] token)"


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def check_config(cfg) -> None:
    """Raise a clear error unless ``cfg`` (a ``Qwen3VLConfig``) describes a model this adapter supports."""
    qwen_common.check_config(cfg)
    levels = getattr(cfg.vision_config, "deepstack_visual_indexes", None)
    if levels is None:
        raise ValueError("config.vision_config.deepstack_visual_indexes must list the DeepStack blocks (may be [])")


def check_model(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` is a stock Qwen3-VL whose tower, merger and DeepStack mergers this
    adapter can drive."""
    qwen_common.check_tower(model, SUPPORTED_CLASSES, TOWER, ("linear_fc1", "linear_fc2"))
    visual = model.model.visual
    if len(getattr(visual, "deepstack_merger_list", ())) != len(visual.deepstack_visual_indexes):
        raise TypeError("the vision tower must have one DeepStack merger per deepstack_visual_indexes entry")


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def layout(config, image_size: tuple[int, int], processor) -> RegionLayout:
    """The region layout of an image of (height, width) as ``processor`` resizes it."""
    return RegionLayout.of(resize_rule(processor, config, DISPLAY).merged(image_size))


# --------------------------------------------------------------------------------------------
# Vision side
# --------------------------------------------------------------------------------------------


def project_rows(model: nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(M, D_llm) tokens and, per DeepStack level, (M, D_llm) rows of vision-space rows (M, (1 + levels) m^2
    D_vis): a merged token's patches of the last block, then of every DeepStack block, each part through its
    own merger (as the tower turns its groups into the token and its DeepStack rows)."""
    visual = model.model.visual
    unit = model.config.vision_config.hidden_size * model.config.vision_config.spatial_merge_size**2
    parts = rows.split(unit, dim=-1)
    d_vis = model.config.vision_config.hidden_size
    main = visual.merger(parts[0].reshape(-1, d_vis))
    deep = [merger(p.reshape(-1, d_vis)) for merger, p in zip(visual.deepstack_merger_list, parts[1:])]
    return main, deep


#: ``compress(model, cfg, pixel_values, image_sizes=None, input_ids=None, attention_mask=None, **vision_kwargs)``
compress = qwen_common.family_compress(lambda: ADAPTER)


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


class Qwen3VLAdapter(QwenAdapter):
    """Qwen3-VL: full-attention ViT with a learned position table, 2 x 2 merger, DeepStack, interleaved M-RoPE."""

    family = FAMILY
    display_name = DISPLAY
    model_classes = SUPPORTED_CLASSES
    config_classes = CONFIG_CLASSES
    tower_name = TOWER
    unsupported_methods = unsupported(DISPLAY)
    checkpoints = ("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-2B-Instruct")

    check_config = staticmethod(check_config)
    check_model = staticmethod(check_model)
    compress_images = staticmethod(compress)
    project_rows = staticmethod(project_rows)


ADAPTER = Qwen3VLAdapter()
