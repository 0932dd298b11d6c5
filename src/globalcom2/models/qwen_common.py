"""Qwen2.5-VL / Qwen3-VL machinery: merged-grid geometry, stock visual features, and packing a shortened
prompt whose kept visual tokens keep their ORIGINAL 3-D M-RoPE positions; then ``QwenAdapter``, what the two
family adapters (``models/qwen2_5_vl.py``, ``models/qwen3_vl.py``) share: the processor's resize rule, the
regions and pooled global view the methods see (``RegionLayout``, ``region_context``: GlobalCom²'s extension
to models without a thumbnail, ``docs/qwen.md``), one hooked tower pass (``tower_pass``), the emission in stock
order with DeepStack rows, and ``pack`` / ``lm_call_context`` on top of the machinery below.

Not a family itself, and pure of any other globalcom2 model family. Works on stock
``Qwen2_5_VLForConditionalGeneration`` and ``Qwen3VLForConditionalGeneration`` (or their ``.model``),
transformers 5.x. Notes with file/line references: ``docs/qwen-notes.md``.

Vocabulary used throughout:

* an image's *stock tokens* are the ``N_i = t * h' * w'`` merged tokens the vision tower emits for it
  (``h' = grid_h // spatial_merge_size``, ``w' = grid_w // spatial_merge_size``, ``grid_*`` from
  ``image_grid_thw``), in the tower's output order, which is raster order over (t, h', w') (Qwen2.5-VL
  un-does its window permutation at the end of the tower): token ``i`` sits at
  ``(i // (h' w'), (i // w') % h', i % w')``;
* ``kept[i]`` are indices into image i's stock tokens; ``features[i][j]`` is the vector that goes to the
  LM for ``kept[i][j]`` and takes that token's stock position;
* "stock positions" are what the model's own ``get_rope_index`` gives the uncompressed prompt.

Three ways to hand the packed prompt to stock ``forward`` / ``generate`` (all exact at R = 1; see the notes):

* ``with packed_lm_inputs(model, packed):`` around a call with ``inputs_embeds=packed.inputs_embeds,
  attention_mask=packed.attention_mask`` and no ``position_ids`` (recommended: every transformers 5.x,
  5.0 included): a pre-hook on the language model sets the stock 3-D positions of the prefill and of
  every decode step, and Qwen3-VL's DeepStack inputs;
* ``packed.embeds_kwargs(generation=...)``: ``inputs_embeds`` + ``attention_mask`` + explicit
  ``position_ids`` (``generate`` carries and extends them from ~5.19); Qwen3-VL's DeepStack then needs
  ``deepstack_injection(model, packed)`` around the call;
* ``packed.encoder_kwargs(generation=...)``: the shortened ``input_ids`` + ``mm_encoder_outputs`` holding
  the kept features (and DeepStack rows) + explicit ``position_ids`` (recent 5.x); stock then scatters
  features and DeepStack rows itself, and ``generate`` expands them for beams / num_return_sequences.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import core
from ..core import scoring
from ..core.context import ImageContext
from ..core.layers import HiddenIndex
from ..methods.base import MethodConfig
from .base import (
    Compressed,
    FamilyAdapter,
    ImageBatch,
    ImageRecord,
    PackedInputs,
    check_class,
    check_pixel_values,
    kept_views,
    text_embeddings,
)

__all__ = [
    "QwenAdapter",
    "QwenImageBatch",
    "QwenImageRecord",
    "QwenImageTokens",
    "QwenPackedInputs",
    "RegionLayout",
    "ResizeRule",
    "TowerPass",
    "TowerReadout",
    "read_tower_pass",
    "tower_hooks",
    "region_context",
    "resize_rule",
    "tower_pass",
    "QwenGeometry",
    "QwenPacked",
    "QwenVisualFeatures",
    "base_model",
    "deepstack_injection",
    "image_geometry",
    "is_qwen3",
    "merged_grid_thw",
    "pack_qwen",
    "packed_lm_inputs",
    "mrope_positions",
    "rope_deltas_for",
    "stock_position_ids",
    "patch_order",
    "token_coords",
    "vision_attention_received",
    "visual_features",
]


# ----------------------------------------------------------------------------------------------- geometry


def base_model(model: nn.Module) -> nn.Module:
    """The ``Qwen2_5_VLModel`` / ``Qwen3VLModel`` (owner of ``visual``, ``language_model``, ``get_rope_index``,
    ``rope_deltas``) of a ``*ForConditionalGeneration`` or of itself."""
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "visual"):
        return inner
    if hasattr(model, "visual") and hasattr(model, "get_rope_index"):
        return model
    raise TypeError(f"not a Qwen-VL model (no .visual / .get_rope_index): {type(model).__name__}")


def is_qwen3(model_or_config) -> bool:
    """Whether this is a Qwen3-VL model/config (DeepStack), judged by its vision config."""
    config = getattr(model_or_config, "config", model_or_config)
    return hasattr(config.vision_config, "deepstack_visual_indexes")


def _vision_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.vision_config


def merged_grid_thw(image_grid_thw: torch.Tensor, model_or_config) -> torch.Tensor:
    """(n_images, 3) long: each image's merged grid (t, h', w') = (t, h // m, w // m), m = spatial_merge_size.

    ``image_grid_thw`` (n_images, 3) is the processor's patch grid (t = frames // temporal_patch_size,
    h = height // patch_size, w = width // patch_size). The merger does not merge time: an image has
    t = 1 and a video frame pair t = 1 per pair.
    """
    m = int(_vision_config(model_or_config).spatial_merge_size)
    grid = torch.as_tensor(image_grid_thw).long().reshape(-1, 3)
    if bool(((grid[:, 1:] % m) != 0).any()):
        raise ValueError(f"image_grid_thw {grid.tolist()} is not divisible by spatial_merge_size {m}")
    return torch.stack([grid[:, 0], grid[:, 1] // m, grid[:, 2] // m], dim=1)


@dataclass(frozen=True)
class QwenGeometry:
    """One image's merged-token layout."""

    t: int  # merged grid: frames (1 for an image)
    h: int  # merged rows (grid_h // spatial_merge_size)
    w: int  # merged columns
    patch_grid: tuple[int, int, int]  # image_grid_thw row (t, grid_h, grid_w), in patches
    patch_size: int
    spatial_merge_size: int
    temporal_patch_size: int

    @property
    def n_tokens(self) -> int:
        return self.t * self.h * self.w

    @property
    def patches_per_token(self) -> int:
        return self.spatial_merge_size**2

    @property
    def pixels(self) -> tuple[int, int]:
        """(height, width) in pixels of the resized image the processor fed the tower."""
        return self.patch_grid[1] * self.patch_size, self.patch_grid[2] * self.patch_size


def image_geometry(image_grid_thw: torch.Tensor, model_or_config) -> list[QwenGeometry]:
    """Per image, its merged grid and patch geometry, read from the config (nothing hard-coded)."""
    vc = _vision_config(model_or_config)
    grid = torch.as_tensor(image_grid_thw).long().reshape(-1, 3)
    merged = merged_grid_thw(grid, model_or_config)
    return [
        QwenGeometry(
            t=int(t),
            h=int(h),
            w=int(w),
            patch_grid=tuple(int(x) for x in g),
            patch_size=int(vc.patch_size),
            spatial_merge_size=int(vc.spatial_merge_size),
            temporal_patch_size=int(vc.temporal_patch_size),
        )
        for (t, h, w), g in zip(merged.tolist(), grid)
    ]


def token_coords(image_grid_thw: torch.Tensor, model_or_config) -> list[torch.Tensor]:
    """Per image, (N_i, 3) long (t, row, col) of each stock merged token on the merged grid, in stock order.

    Stock order is raster over (t, h', w'): token i -> (i // (h' w'), (i // w') % h', i % w').
    """
    merged = merged_grid_thw(image_grid_thw, model_or_config)  # (n, 3)
    counts = merged.prod(1)  # (n,)
    if counts.numel() == 0:
        return []
    starts = F.pad(counts.cumsum(0)[:-1], (1, 0))  # (n,)
    local = torch.arange(int(counts.sum())) - starts.repeat_interleave(counts)  # (sum N,) index inside image
    hw = (merged[:, 1] * merged[:, 2]).repeat_interleave(counts)  # (sum N,)
    w = merged[:, 2].repeat_interleave(counts)
    coords = torch.stack([local // hw, (local % hw) // w, local % w], dim=1)  # (sum N, 3)
    return list(coords.split(counts.tolist()))


# ---------------------------------------------------------------------------------------- visual features


@dataclass
class QwenVisualFeatures:
    """What the stock vision path gives, per image."""

    features: list[torch.Tensor]  # per image (N_i, D_llm): merged tokens in stock (raster) order
    deepstack: list[list[torch.Tensor]] | None  # Qwen3-VL: [level][image] (N_i, D_llm); None for Qwen2.5-VL
    last_hidden_state: torch.Tensor  # (sum patches, D_vit) pre-merger; Qwen2.5-VL: in WINDOW order (see notes)
    output: object  # the stock BaseModelOutputWithPooling / BaseModelOutputWithDeepstackFeatures


def visual_features(model: nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> QwenVisualFeatures:
    """Run the model's own vision path (``get_image_features``) and split its outputs per image.

    Exactly the tensors stock ``forward`` scatters into ``inputs_embeds`` (and, for Qwen3-VL, adds to the
    first LM layers' outputs), so packing them unchanged reproduces stock bit for bit.
    """
    base = base_model(model)
    out = base.get_image_features(pixel_values, image_grid_thw, return_dict=True)
    feats = list(out.pooler_output)
    deep = getattr(out, "deepstack_features", None)
    counts = [f.shape[0] for f in feats]
    # transformers >= 5.x splits every DeepStack level per image; 5.0 leaves each level one (sum N_i, D) tensor
    deepstack = (
        [list(level.split(counts)) if isinstance(level, torch.Tensor) else list(level) for level in deep]
        if deep is not None
        else None
    )
    return QwenVisualFeatures(feats, deepstack, out.last_hidden_state, out)


# ------------------------------------------------------------------------------- inside the vision tower


def _window_index(model, image_grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Qwen2.5-VL's (window_index over merge groups, cu_window_seqlens); None for a tower without windows."""
    vis = base_model(model).visual
    if not hasattr(vis, "fullatt_block_indexes"):
        return None
    grid = torch.as_tensor(image_grid_thw).long().reshape(-1, 3)
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # pragma: no cover - transformers < 5.x with vision_utils: the tower's own method
        return vis.get_window_index(grid)
    return get_vision_window_index(grid, vis.spatial_merge_size, vis.window_size, vis.patch_size)


def patch_order(model, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """(sum patches,) long: row r of the tower's internal patch sequence is processor patch ``patch_order[r]``.

    The processor lays each image's patches out block-major (merged cell by merged cell, raster over cells,
    then the m x m patches of a cell in raster order); ``pixel_values`` rows are in that order. Qwen3-VL keeps
    it (identity). Qwen2.5-VL permutes whole merge groups into window order before its blocks
    (``permute_input_for_window_attn``) and only un-permutes the merged output, so its pre-merger hidden
    states (``last_hidden_state``, block inputs/outputs) are in window order: ``x[argsort(patch_order)]``
    puts them back in processor order.
    """
    grid = torch.as_tensor(image_grid_thw).long().reshape(-1, 3)
    total = int(grid.prod(1).sum())
    win = _window_index(model, grid)
    if win is None:
        return torch.arange(total)
    unit = int(base_model(model).visual.spatial_merge_size) ** 2
    return (win[0].long()[:, None] * unit + torch.arange(unit)).reshape(-1)  # (sum patches,)


@dataclass
class QwenAttentionScores:
    """Attention received in one vision block, per image (float32)."""

    tokens: list[torch.Tensor]  # per image (N_i,): sum over the merged token's m x m patches, stock order
    patches: list[torch.Tensor]  # per image (t h w,): per patch, processor (block-major) order
    layer: int  # the block index
    windowed: bool  # Qwen2.5-VL window-attention block (scores are per window: a window's patches sum to 1)


@dataclass
class BlockInput:
    """What one vision block received in a tower pass (captured by a forward pre-hook)."""

    hidden: torch.Tensor  # (S, D) tower order
    cu_seqlens: torch.Tensor  # (segments + 1,) attention segments: windows or images
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # the 2-D rotary (cos, sin)


def capture_block_input(block: nn.Module, seen: dict, key: str = "input"):
    """Register a pre-hook storing ``block``'s ``BlockInput`` in ``seen[key]``; returns the handle."""

    def hook(_m, args, kwargs):
        seen[key] = BlockInput(args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"],
                               kwargs["position_embeddings"])  # fmt: skip

    return block.register_forward_pre_hook(hook, with_kwargs=True)


def block_qk(block: nn.Module, inp: BlockInput, rotary: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, k), each (H, S, hd) float32, as the block computes them: ``norm1`` -> fused ``qkv`` -> heads ->
    (with ``rotary``) the 2-D vision rotary embedding, taken from the block's own module (or
    ``block.attn.apply_rotary`` where a stand-in block carries it)."""
    import sys

    seq, heads = inp.hidden.shape[0], block.attn.num_heads
    with torch.no_grad():
        q, k, _ = block.attn.qkv(block.norm1(inp.hidden)).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        if rotary:
            cos, sin = inp.position_embeddings
            rotate = getattr(block.attn, "apply_rotary", None)  # a stand-in block names its rotary (vLLM plugin)
            if rotate is None:
                rotate = sys.modules[type(block.attn).__module__].apply_rotary_pos_emb_vision
            q, k = rotate(q, k, cos, sin)
    return q.float().transpose(0, 1), k.float().transpose(0, 1)


def attention_received(block: nn.Module, inp: BlockInput) -> tuple[torch.Tensor, torch.Tensor]:
    """((S,) float32 attention each patch receives, (S,) long size of its attention segment), tower order.

    Mean over heads and over the queries of its segment (an image for full-attention blocks and Qwen3-VL; a
    window for Qwen2.5-VL's windowed blocks) of softmax(q k^T * scaling), softmax in float32: a segment's
    scores sum to 1. One segment at a time (the largest buffer is one segment's (H, n, n) map).
    """
    q, k = block_qk(block, inp)
    cu = inp.cu_seqlens.long()
    received = torch.zeros(q.shape[1], dtype=torch.float32, device=q.device)  # (S,)
    size = torch.ones(q.shape[1], dtype=torch.long, device=q.device)
    with torch.no_grad():
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):  # loop over attention segments (windows / images)
            if b == a:
                continue
            probs = torch.softmax(q[:, a:b] @ k[:, a:b].transpose(1, 2) * block.attn.scaling, dim=-1)  # (H, n, n)
            received[a:b] = probs.mean(dim=(0, 1))  # (n,) mean over heads and queries
            size[a:b] = b - a
    return received, size


def to_processor_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Rows of a tower-order tensor (S, ...) put in processor (block-major) order (``patch_order``)."""
    out = torch.empty_like(x)
    out[order.to(x.device)] = x
    return out


def vision_attention_received(
    model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, layer: int = -1
) -> QwenAttentionScores:
    """Recompute block ``layer``'s attention from its input and score each patch by the attention it receives:
    mean over heads and over the queries of its attention segment (an image for full-attention blocks and
    Qwen3-VL; a window for Qwen2.5-VL's windowed blocks) of softmax(q k^T / sqrt(d)), so each segment's
    scores sum to 1. Tokens get the sum over their m x m patches. q/k come from the block's own fused ``qkv``
    linear after ``norm1`` and the 2-D vision rotary embedding, as in the stock block; softmax in float32.
    """
    base = base_model(model)
    vis = base.visual
    idx = layer % len(vis.blocks)
    blk = vis.blocks[idx]
    seen: dict = {}
    handle = capture_block_input(blk, seen)
    try:
        with torch.no_grad():
            base.get_image_features(pixel_values, image_grid_thw)
    finally:
        handle.remove()
    received, _ = attention_received(blk, seen["input"])
    stock = to_processor_order(received, patch_order(model, image_grid_thw))
    grid = torch.as_tensor(image_grid_thw).long().reshape(-1, 3)
    unit = int(vis.spatial_merge_size) ** 2
    patches = list(stock.split(grid.prod(1).tolist()))
    tokens = [p.reshape(-1, unit).sum(1) for p in patches]  # (N_i,)
    windowed = hasattr(vis, "fullatt_block_indexes") and idx not in vis.fullatt_block_indexes
    return QwenAttentionScores(tokens, patches, idx, windowed)


# ------------------------------------------------------------------------------------------------ packing


def _mm_token_type_ids(config, input_ids: torch.Tensor) -> torch.Tensor:
    """text 0 / image 1 / video 2 per token, as the processor's ``mm_token_type_ids``."""
    types = torch.zeros_like(input_ids)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


def stock_position_ids(
    model: nn.Module,
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own ``get_rope_index`` on the uncompressed prompt: ((3, B, L) positions, (B, 1) rope_deltas).

    Padding (``attention_mask == 0``) gets a dummy position (0 in transformers 5.24, 1 in 5.0). Where
    ``get_rope_index`` takes ``mm_token_type_ids`` (recent 5.x) they default to the types read from
    ``input_ids`` (what the processor returns); transformers 5.0 finds images from ``input_ids`` itself.
    """
    import inspect

    base = base_model(model)
    kwargs = {"image_grid_thw": image_grid_thw, "attention_mask": attention_mask}
    if "mm_token_type_ids" in inspect.signature(base.get_rope_index).parameters:  # transformers >= 5.1x
        kwargs["mm_token_type_ids"] = (
            _mm_token_type_ids(base.config, input_ids) if mm_token_type_ids is None else mm_token_type_ids
        )
    return base.get_rope_index(input_ids, **kwargs)


@dataclass
class QwenPacked:
    """A shortened batch for the language model (B rows, L' = longest kept row)."""

    input_ids: torch.Tensor  # (B, L') long: kept tokens of the prompt (visual ones stay image placeholders)
    inputs_embeds: torch.Tensor  # (B, L', D): text embeddings, kept visual features at visual slots
    attention_mask: torch.Tensor  # (B, L') long
    position_ids: torch.Tensor  # (3, B, L') long: stock 3-D positions of every kept token; padding 0
    rope_deltas: torch.Tensor  # (B, 1) long: stock max position + 1 - kept (attended) row length
    rope_deltas_padded: torch.Tensor  # (B, 1) long: stock max position + 1 - L' (padded row length)
    visual_pos_masks: torch.Tensor  # (B, L') bool: slots holding visual features
    deepstack_visual_embeds: list[torch.Tensor] | None  # per level (K, D), rows in visual_pos_masks order
    image_features: list[torch.Tensor]  # per image (K_i, D) kept features, in sequence order
    image_deepstack: list[list[torch.Tensor]] | None  # [level][image] (K_i, D) kept rows
    kept: list[torch.Tensor]  # per image (K_i,) long: sorted stock token indices that were kept
    keep_mask: torch.Tensor  # (B, L) bool over the ORIGINAL prompt: which columns survive
    image_spans: list[list[tuple[int, int]]]  # per row, [start, end) of each image's kept tokens in L'
    stock_position_ids: torch.Tensor  # (3, B, L) the uncompressed prompt's stock positions
    stock_rope_deltas: torch.Tensor  # (B, 1)
    labels: torch.Tensor | None = None  # (B, L') the kept columns' labels, or None

    def text_positions(self) -> torch.Tensor:
        """(B, L') 1-D positions of the shortened rows (mask cumsum - 1, padding 0): row 0 of stock
        ``generate``'s 4-row position_ids (used only for packed-sequence masks / flash attention)."""
        pos = self.attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(self.attention_mask == 0, 0)

    def generation_position_ids(self) -> torch.Tensor:
        """(4, B, L'): [text positions; t; h; w], the layout stock ``generate`` builds
        (``_prepare_position_ids_for_generation``) and then extends by ``last + 1`` per new token."""
        return torch.cat([self.text_positions()[None], self.position_ids], dim=0)

    def embeds_kwargs(self, generation: bool = False) -> dict:
        """Keyword arguments for stock ``forward`` (3-row position_ids, as stock ``get_rope_index``) or
        ``generate`` (4-row, as stock generate); Qwen3-VL also needs ``deepstack_injection``."""
        pos = self.generation_position_ids() if generation else self.position_ids
        return {"inputs_embeds": self.inputs_embeds, "attention_mask": self.attention_mask, "position_ids": pos}

    def encoder_kwargs(self, generation: bool = False) -> dict:
        """Keyword arguments for stock ``forward`` / ``generate`` that carry the kept features as
        precomputed ``mm_encoder_outputs`` next to the shortened ``input_ids`` (stock then scatters the
        features and, for Qwen3-VL, the DeepStack rows itself)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        feats = tuple(self.image_features)
        if self.image_deepstack is not None:
            from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

            out = BaseModelOutputWithDeepstackFeatures(
                pooler_output=feats, deepstack_features=[tuple(level) for level in self.image_deepstack]
            )
        else:
            out = BaseModelOutputWithPooling(pooler_output=feats)
        pos = self.generation_position_ids() if generation else self.position_ids
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": pos,
            "mm_encoder_outputs": {"image": out},
        }


def _check_blocks(is_img_flat: torch.Tensor, counts: torch.Tensor, seq_len: int) -> None:
    """Each image's placeholders must be one run inside one row, separated from the next image's run."""
    flat = torch.nonzero(is_img_flat).squeeze(1)  # (sum N,) flat index b * L + l, row-major
    if flat.numel() == 0:
        return
    starts = F.pad(counts.cumsum(0)[:-1], (1, 0))  # (n,) first global index of each image
    first = torch.zeros(flat.numel(), dtype=torch.bool)
    first[starts[counts > 0]] = True
    gaps = torch.diff(flat, prepend=flat[:1] - 2)  # (sum N,)
    rows = flat // seq_len
    same_row = torch.diff(rows, prepend=rows[:1]) == 0
    inside_ok = (gaps == 1) & same_row
    if bool((~first & ~inside_ok).any()):
        raise ValueError(
            "each image's <|image_pad|> tokens must be one consecutive run in one prompt row, as many as "
            "image_grid_thw gives it (t * h * w / spatial_merge_size**2); pass input_ids and image_grid_thw "
            "from the same processor call"
        )
    if bool((first & (gaps == 1) & same_row)[1:].any()):
        raise ValueError(
            "two images' <|image_pad|> runs touch: stock get_rope_index (which groups consecutive "
            "mm_token_type_ids) would read them as one image; put <|vision_end|><|vision_start|> between them"
        )


def pack_qwen(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor,
    features: Sequence[torch.Tensor],
    kept: Sequence[torch.Tensor],
    deepstack: Sequence[Sequence[torch.Tensor]] | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    padding_side: str = "left",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> QwenPacked:
    """Splice each image's kept features into the prompt; every kept token keeps its stock position.

    input_ids: (B, L) from the processor (``N_i`` ``<|image_pad|>`` tokens per image, images in row-major
        order); attention_mask: (B, L) or None; image_grid_thw: (n_images, 3).
    features[i]: (K_i, D) vectors for image i; kept[i]: (K_i,) distinct indices in [0, N_i) — the stock
        token whose position row j of ``features[i]`` takes. Rows are reordered by ascending index, so the
        packed sequence is "stock with the other visual tokens removed".
    deepstack: Qwen3-VL only, [level][image] (K_i, D) rows aligned with ``features`` (same kept indices);
        required for a Qwen3-VL model, refused for Qwen2.5-VL.
    padding_side: where the shortened rows are padded ("left" for generate).
    labels: (B, L) or None: the kept columns' labels (``ignore_index`` at visual slots and padding), in
        ``QwenPacked.labels``.

    Text tokens (chat template, <|vision_start|>/<|vision_end|>, the question) are all kept.
    """
    base = base_model(model)
    config = base.config
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    bsz, seq_len = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if tuple(attention_mask.shape) != (bsz, seq_len):
        raise ValueError(f"attention_mask must be {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")
    am = attention_mask.bool()  # (B, L)
    grid = torch.as_tensor(image_grid_thw).long().reshape(-1, 3)
    n_img = grid.shape[0]
    counts = merged_grid_thw(grid, config).prod(1)  # (n,) stock tokens per image
    if len(features) != n_img or len(kept) != n_img:
        raise ValueError(f"{n_img} images in image_grid_thw but {len(features)} features / {len(kept)} kept")
    qwen3 = is_qwen3(config)
    if qwen3 and deepstack is None:
        raise ValueError("Qwen3-VL needs the kept DeepStack rows (deepstack=[level][image]) next to the features")
    if not qwen3 and deepstack is not None:
        raise ValueError("deepstack rows were given but this Qwen2.5-VL model has no DeepStack")

    is_img = input_ids == config.image_token_id  # (B, L)
    if bool((is_img & ~am).any()):
        raise ValueError("<|image_pad|> tokens must not be masked out by attention_mask")
    if int(is_img.sum()) != int(counts.sum()):
        raise ValueError(
            f"input_ids hold {int(is_img.sum())} <|image_pad|> tokens but image_grid_thw needs "
            f"{int(counts.sum())} ({counts.tolist()}); pass both from the same processor call"
        )
    _check_blocks(is_img.reshape(-1).cpu(), counts, seq_len)

    # sort every image's kept indices; reorder its feature (and DeepStack) rows alike
    kept_sorted, feats_sorted, orders = [], [], []
    for i in range(n_img):  # loop over images, not tokens
        k = torch.as_tensor(kept[i], dtype=torch.long, device=device).reshape(-1)  # (K_i,)
        if features[i].shape[0] != k.numel():
            raise ValueError(f"image {i}: {features[i].shape[0]} feature rows but {k.numel()} kept indices")
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= int(counts[i])):
            raise ValueError(f"image {i}: kept indices must lie in [0, {int(counts[i])})")
        order = torch.argsort(k, stable=True)
        k = k[order]
        if bool((k[1:] == k[:-1]).any()):
            raise ValueError(f"image {i}: kept indices must be distinct (one token per stock position)")
        kept_sorted.append(k)
        orders.append(order)
        feats_sorted.append(features[i][order.to(features[i].device)])

    # which original columns survive: text columns, and the kept placeholders
    offsets = F.pad(counts.cumsum(0)[:-1], (1, 0)).to(device)  # (n,)
    kept_global = torch.cat([k + offsets[i] for i, k in enumerate(kept_sorted)]) if n_img else counts.new_zeros(0)
    vis_keep = torch.zeros(int(counts.sum()), dtype=torch.bool, device=device)  # (sum N,) row-major visual order
    vis_keep[kept_global] = True
    keep = am.clone()  # (B, L)
    keep[is_img] = vis_keep

    stock_pos, stock_deltas = stock_position_ids(model, input_ids, grid, attention_mask, mm_token_type_ids)
    n_keep = keep.sum(1)  # (B,)
    if bool((n_keep == 0).any()):
        empty = torch.nonzero(n_keep == 0).squeeze(1).tolist()
        raise ValueError(
            f"row(s) {empty} of the batch would reach the language model with no token at all: their prompt is "
            "only image placeholders and the method keeps none of the image's tokens at this retention_ratio; "
            "raise retention_ratio or put text in the prompt"
        )
    if labels is not None and tuple(labels.shape) != (bsz, seq_len):
        raise ValueError(f"labels must have the shape of input_ids {(bsz, seq_len)}, got {tuple(labels.shape)}")
    new_len = int(n_keep.max())
    rank = keep.long().cumsum(1) - 1  # (B, L): slot of each kept column inside its row
    shift = (new_len - n_keep)[:, None] if padding_side == "left" else torch.zeros_like(n_keep)[:, None]
    b_idx, l_idx = torch.nonzero(keep, as_tuple=True)  # (n_kept_total,) row-major
    d_idx = (rank + shift)[b_idx, l_idx]  # destination slot in the shortened row

    embed = base.get_input_embeddings()
    pad_id = config.text_config.pad_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    new_ids = input_ids.new_full((bsz, new_len), pad_id)  # (B, L')
    new_ids[b_idx, d_idx] = input_ids[b_idx, l_idx]
    new_mask = torch.zeros(bsz, new_len, dtype=attention_mask.dtype, device=device)  # (B, L')
    new_mask[b_idx, d_idx] = 1
    vis_mask = torch.zeros(bsz, new_len, dtype=torch.bool, device=device)  # (B, L')
    vis_mask[b_idx, d_idx] = is_img[b_idx, l_idx]
    new_labels = None
    if labels is not None:
        new_labels = labels.new_full((bsz, new_len), ignore_index)  # (B, L')
        new_labels[b_idx, d_idx] = labels[b_idx, l_idx].masked_fill(is_img[b_idx, l_idx], ignore_index)
    embeds = embed(new_ids)  # (B, L', D) text embeddings (stock embeds pads too)
    vis_rows = torch.cat(feats_sorted, 0) if n_img else embeds.new_zeros(0, embeds.shape[-1])  # (K, D)
    embeds = embeds.masked_scatter(vis_mask[..., None], vis_rows.to(embeds.device, embeds.dtype))
    new_pos = stock_pos.new_zeros(3, bsz, new_len)  # (3, B, L')
    new_pos[:, b_idx, d_idx] = stock_pos[:, b_idx, l_idx]
    stock_max = stock_pos.masked_fill(~am[None], torch.iinfo(stock_pos.dtype).min).amax(dim=(0, 2))  # (B,)
    rope_deltas = (stock_max + 1 - n_keep)[:, None].to(stock_deltas.dtype)  # (B, 1)
    rope_deltas_padded = (stock_max + 1 - new_len)[:, None].to(stock_deltas.dtype)  # (B, 1)

    deep_levels, image_deep = None, None
    if qwen3:
        image_deep = [
            [level[i][orders[i].to(level[i].device)] for i in range(n_img)] for level in deepstack
        ]  # [level][image] (K_i, D)
        for lvl in image_deep:
            for i, rows in enumerate(lvl):
                if rows.shape[0] != kept_sorted[i].numel():
                    raise ValueError(
                        f"image {i}: DeepStack rows do not match its {kept_sorted[i].numel()} kept indices"
                    )
        deep_levels = [torch.cat(lvl, 0) for lvl in image_deep]  # per level (K, D), visual_pos_masks order

    # spans of each image's kept tokens in the shortened rows (one image = one run of slots)
    vb, vl = torch.nonzero(vis_mask, as_tuple=True)  # (K,)
    spans: list[list[tuple[int, int]]] = [[] for _ in range(bsz)]
    if vb.numel():
        ks = torch.tensor([k.numel() for k in kept_sorted], device=device)
        first = F.pad(ks.cumsum(0)[:-1], (1, 0))
        for i in range(n_img):  # per image
            if ks[i] == 0:
                continue
            j = int(first[i])
            spans[int(vb[j])].append((int(vl[j]), int(vl[j]) + int(ks[i])))
    return QwenPacked(
        input_ids=new_ids,
        inputs_embeds=embeds,
        attention_mask=new_mask,
        position_ids=new_pos,
        rope_deltas=rope_deltas,
        rope_deltas_padded=rope_deltas_padded,
        visual_pos_masks=vis_mask,
        deepstack_visual_embeds=deep_levels,
        image_features=feats_sorted,
        image_deepstack=image_deep,
        kept=kept_sorted,
        keep_mask=keep,
        image_spans=spans,
        stock_position_ids=stock_pos,
        stock_rope_deltas=stock_deltas,
        labels=new_labels,
    )


@contextlib.contextmanager
def _lm_pre_hook(lm: nn.Module, hook) -> Iterator[None]:
    """``hook`` as a keyword pre-hook of ``lm`` for the block."""
    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _expand_deepstack(packed: QwenPacked, k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """visual_pos_masks / DeepStack rows for a batch whose rows were repeat_interleave'd k times
    (generate's expansion for beams / num_return_sequences)."""
    masks = packed.visual_pos_masks
    if k == 1:
        return masks, packed.deepstack_visual_embeds
    rows = torch.nonzero(masks, as_tuple=True)[0]  # (K,) row of each visual slot
    n = rows.numel()
    idx = torch.arange(n, device=masks.device).repeat(k)  # (k K,)
    copy = torch.arange(k, device=masks.device).repeat_interleave(n)  # (k K,)
    order = torch.argsort(rows[idx] * k + copy, stable=True)  # expanded row b*k+j, slots in order
    gather = idx[order]
    return masks.repeat_interleave(k, dim=0), [lvl[gather.to(lvl.device)] for lvl in packed.deepstack_visual_embeds]


@contextlib.contextmanager
def deepstack_injection(model: nn.Module, packed: QwenPacked) -> Iterator[None]:
    """Hand ``packed``'s DeepStack rows to the first language-model call inside the block (the prefill).

    Stock ``Qwen3VLModel.forward`` only builds ``visual_pos_masks`` / ``deepstack_visual_embeds`` from
    ``input_ids`` + pixels (modeling_qwen3_vl.py, ``Qwen3VLModel.forward``) and passes them to
    ``language_model`` explicitly (so they cannot travel in ``**kwargs``); with ``inputs_embeds`` it passes
    None. A forward pre-hook on ``language_model`` fills them in for the one call whose ``inputs_embeds``
    has the packed length (batch = B or a multiple, for generate's expansion). No-op for Qwen2.5-VL.
    """
    if packed.deepstack_visual_embeds is None:
        yield
        return
    lm = base_model(model).language_model
    state = {"done": False}
    bsz, length = packed.visual_pos_masks.shape

    def hook(_module, args, kwargs):
        emb = kwargs.get("inputs_embeds")
        if state["done"] or emb is None or kwargs.get("deepstack_visual_embeds") is not None:
            return None
        if emb.shape[1] != length or emb.shape[0] % bsz:
            return None
        masks, levels = _expand_deepstack(packed, emb.shape[0] // bsz)
        kwargs["visual_pos_masks"] = masks.to(emb.device)
        kwargs["deepstack_visual_embeds"] = levels
        state["done"] = True
        return args, kwargs

    with _lm_pre_hook(lm, hook):
        yield


def rope_deltas_for(model: nn.Module, packed: QwenPacked) -> torch.Tensor:
    """The (B, 1) value to store in ``model.model.rope_deltas`` after a packed prefill, in the convention of the
    installed transformers, so that stock's own fallback for a later call without ``position_ids`` (a
    hand-written decoding loop) continues at stock's positions.

    transformers >= 5.1x (``compute_3d_position_ids``): deltas relative to the attended row length (stock
    ``get_rope_index`` returns ``max + 1 - len(unpadded row)``); transformers 5.0: relative to the padded
    length (``max + 1 - len(row)``, used as ``cache length + delta``). Without padding they coincide.
    """
    if hasattr(base_model(model), "compute_3d_position_ids"):
        return packed.rope_deltas
    return packed.rope_deltas_padded


def _cache_length(kwargs: dict) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0


@contextlib.contextmanager
def mrope_positions(model: nn.Module, packed: QwenPacked) -> Iterator[None]:
    """Own the 3-D positions of every language-model call inside the block, whatever ``generate`` computes.

    * the prefill (empty cache, ``L'`` tokens): ``packed.position_ids`` (stock positions of the kept tokens);
    * any later call with ``c`` cached tokens: token ``c + i`` sits at ``c + i + rope_deltas_padded``, i.e. new
      token ``i`` at stock's last prompt position + 1 + i (t, h and w alike), as stock decodes.

    Works across transformers 5.x: 5.0's ``generate`` neither carries nor extends 3-D ``position_ids``
    (``prepare_inputs_for_generation`` rebuilds them from ``cache_position + rope_deltas``, and with
    ``inputs_embeds`` it has no ``input_ids`` to run ``get_rope_index`` on). A 4-row input (row 0 = 1-D text
    positions, recent 5.x) keeps its row 0. Batches expanded by ``generate`` (beams, num_return_sequences:
    each row repeated k times) are handled.
    """
    lm = base_model(model).language_model
    bsz, length = packed.attention_mask.shape

    def hook(_module, args, kwargs):
        ref = kwargs.get("inputs_embeds")
        if ref is None:
            ref = kwargs.get("input_ids")
        if ref is None or ref.shape[0] % bsz:
            return None
        k, q = ref.shape[0] // bsz, ref.shape[1]
        past = _cache_length(kwargs)
        if past == 0 and q == length:
            pos3 = packed.position_ids.repeat_interleave(k, dim=1)  # (3, kB, L')
        elif past >= length:
            delta = packed.rope_deltas_padded.repeat_interleave(k, dim=0)  # (kB, 1)
            steps = torch.arange(past, past + q, device=delta.device)[None]  # (1, q)
            pos3 = (steps + delta)[None].expand(3, -1, -1)  # (3, kB, q)
        else:
            return None
        pos3 = pos3.to(ref.device)
        given = kwargs.get("position_ids")
        if given is not None and given.ndim == 3 and given.shape[0] == 4 and given.shape[-1] == q:
            pos3 = torch.cat([given[:1].to(pos3.dtype), pos3], dim=0)  # keep the 1-D text row
        kwargs["position_ids"] = pos3
        return args, kwargs

    with _lm_pre_hook(lm, hook):
        yield


@contextlib.contextmanager
def packed_lm_inputs(model: nn.Module, packed: QwenPacked) -> Iterator[None]:
    """``mrope_positions`` + ``deepstack_injection`` + ``model.model.rope_deltas``: everything stock ``forward`` /
    ``generate`` on ``inputs_embeds=packed.inputs_embeds, attention_mask=packed.attention_mask`` need (no
    ``position_ids`` argument) to run exactly "stock with the dropped visual tokens removed".

    ``rope_deltas`` is (re)set when the block ends: stock overwrites it inside the call (transformers 5.0's
    forward re-runs ``get_rope_index`` on the prefill; recent ``generate`` stores zeros for an
    ``inputs_embeds`` prompt), and a later hand-written decoding step without ``position_ids`` reads it.
    """
    base = base_model(model)
    base.rope_deltas = rope_deltas_for(model, packed)
    try:
        with mrope_positions(model, packed), deepstack_injection(model, packed):
            yield
    finally:
        base.rope_deltas = rope_deltas_for(model, packed)


# ======================================================================================================
# The adapter shared by Qwen2.5-VL and Qwen3-VL (each family file subclasses ``QwenAdapter``)
# ======================================================================================================

# ------------------------------------------------------------------------------- the processor's rules


def smart_resize_rule():
    """The Qwen2-VL image processor's own ``smart_resize`` (the PIL module from transformers 5.4, before that
    the processor module itself)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:  # pragma: no cover - transformers < 5.4
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize


def _setting(obj: Any, name: str) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


@dataclass(frozen=True)
class ResizeRule:
    """How the processor resizes an image before the tower: ``smart_resize`` to multiples of ``factor``
    (``patch_size * merge_size``) with between ``min_pixels`` and ``max_pixels`` pixels."""

    min_pixels: int
    max_pixels: int
    factor: int

    def resized(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) in pixels the tower sees for an image of ``image_size``."""
        h, w = smart_resize_rule()(int(image_size[0]), int(image_size[1]), self.factor, self.min_pixels,
                                   self.max_pixels)  # fmt: skip
        return int(h), int(w)

    def merged(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(H, W) merged tokens of an image of ``image_size``."""
        h, w = self.resized(image_size)
        return h // self.factor, w // self.factor


PROCESSOR_HINT = (
    "pass processor= the model's processor (AutoProcessor.from_pretrained(checkpoint)), its image_processor, "
    "or a mapping {'min_pixels': ..., 'max_pixels': ...} of its preprocessor_config.json"
)


def resize_rule(processor: Any, config: Any, family: str) -> ResizeRule:
    """The resize rule of ``processor`` (a processor, its image processor, or a mapping of their settings:
    ``min_pixels``/``max_pixels`` or ``size={"shortest_edge", "longest_edge"}``), checked against ``config``.

    ValueError naming ``processor`` when it is missing or disagrees with the model's patch/merge sizes.
    """
    if processor is None:
        raise ValueError(
            f"processor is required to count {family}'s visual tokens from an image size: the processor resizes "
            f"every image (smart_resize between min_pixels and max_pixels), which the model config does not hold; "
            f"{PROCESSOR_HINT}"
        )
    ip = getattr(processor, "image_processor", processor)
    size = _setting(ip, "size")
    lo = _setting(size, "shortest_edge") or _setting(ip, "min_pixels")
    hi = _setting(size, "longest_edge") or _setting(ip, "max_pixels")
    if lo is None or hi is None:
        raise ValueError(
            f"processor must give min_pixels and max_pixels (or size shortest/longest_edge); {PROCESSOR_HINT}"
        )
    vc = config.vision_config
    for name, want in (("patch_size", vc.patch_size), ("merge_size", vc.spatial_merge_size),
                       ("temporal_patch_size", vc.temporal_patch_size)):  # fmt: skip
        got = _setting(ip, name)
        if got is not None and int(got) != int(want):
            raise ValueError(
                f"processor has {name}={got} but the model's vision_config says {want}: pass the processor of "
                "this checkpoint"
            )
    return ResizeRule(int(lo), int(hi), int(vc.patch_size) * int(vc.spatial_merge_size))


# ------------------------------------------------------------------------- the regions and global view

#: target side, in merged tokens, of the blocks that play the crops: LLaVA-NeXT's crop side (336 px / 14 px),
#: so a region holds about as many tokens as an AnyRes crop and the global view about as many as its thumbnail
REGION_SIDE = 24


@dataclass(frozen=True)
class RegionLayout:
    """One image's merged token map cut into a grid of blocks, the library's stand-in for AnyRes crops.

    merged: (H, W) merged tokens; grid: (nph, npw) blocks; row_edges / col_edges: the blocks' bounds
    (``floor(i H / nph)``), so blocks differ by at most one row or column. ``side`` S is the largest block
    side: every block sits at the top-left of an S x S slot grid, and the global view is the map pooled to
    S x S (one view's worth of tokens, as a thumbnail is one crop's worth).
    """

    merged: tuple[int, int]
    grid: tuple[int, int]
    row_edges: tuple[int, ...]
    col_edges: tuple[int, ...]

    @classmethod
    def of(cls, merged: tuple[int, int], region_side: int = REGION_SIDE) -> RegionLayout:
        """The layout of an H x W map: ``max(1, round(H / region_side))`` block rows, likewise columns, so
        blocks stay near-square and the grid follows the image's aspect ratio (AnyRes picks its crop grid by
        the aspect ratio too)."""
        h, w = int(merged[0]), int(merged[1])
        nph = min(max(1, math.floor(h / region_side + 0.5)), h)
        npw = min(max(1, math.floor(w / region_side + 0.5)), w)
        rows = tuple(i * h // nph for i in range(nph + 1))
        cols = tuple(j * w // npw for j in range(npw + 1))
        return cls((h, w), (nph, npw), rows, cols)

    @property
    def side(self) -> int:
        """S, the slot grid's side (the largest block side)."""
        dh = max(b - a for a, b in zip(self.row_edges, self.row_edges[1:]))
        dw = max(b - a for a, b in zip(self.col_edges, self.col_edges[1:]))
        return max(dh, dw)

    @property
    def n_tokens(self) -> int:
        """T = H W, the image's stock tokens."""
        return self.merged[0] * self.merged[1]

    def slots(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """((n, N) long merged raster index of every slot, (n, N) bool real slots). An empty slot repeats its
        block's first token, so per-token tensors laid out by it stay finite (never a candidate)."""
        (_, w), (nph, npw), s = self.merged, self.grid, self.side
        re = torch.tensor(self.row_edges, device=device)
        ce = torch.tensor(self.col_edges, device=device)
        a = torch.arange(s, device=device)
        rr = re[:-1, None] + a[None]  # (nph, S) merged row of each slot row
        cc = ce[:-1, None] + a[None]  # (npw, S)
        rok = a[None] < (re[1:] - re[:-1])[:, None]  # (nph, S)
        cok = a[None] < (ce[1:] - ce[:-1])[:, None]  # (npw, S)
        valid = rok[:, None, :, None] & cok[None, :, None, :]  # (nph, npw, S, S)
        index = rr[:, None, :, None] * w + cc[None, :, None, :]  # (nph, npw, S, S)
        first = (re[:-1, None] * w + ce[None, :-1])[..., None, None]  # (nph, npw, 1, 1)
        index = torch.where(valid, index, first.expand_as(index))
        return index.reshape(nph * npw, s * s), valid.reshape(nph * npw, s * s)

    def stock_order(self, device=None) -> torch.Tensor:
        """(T,) long context index (view * N + slot, view 0 the global view) of every merged token, raster order."""
        (h, w), (_, npw), s = self.merged, self.grid, self.side
        re = torch.tensor(self.row_edges, device=device)
        ce = torch.tensor(self.col_edges, device=device)
        y, x = torch.arange(h, device=device), torch.arange(w, device=device)
        r = torch.searchsorted(re[1:], y, right=True)  # (H,) block row of each merged row
        c = torch.searchsorted(ce[1:], x, right=True)  # (W,)
        view = 1 + r[:, None] * npw + c[None, :]  # (H, W)
        slot = (y - re[r])[:, None] * s + (x - ce[c])[None, :]
        return (view * s * s + slot).reshape(-1)

    def global_view(self, x: torch.Tensor) -> torch.Tensor:
        """(S^2, ...) the map of x: (T, ...) per merged token, adaptive-average-pooled to S x S (float32 for
        1-D x)."""
        (h, w), s = self.merged, self.side
        flat = x.float() if x.dim() == 1 else x
        m = flat.reshape(h, w, -1).permute(2, 0, 1)[None]  # (1, D, H, W)
        pooled = F.adaptive_avg_pool2d(m, (s, s))[0]  # (D, S, S)
        out = pooled.reshape(pooled.shape[0], s * s).t()  # (S^2, D)
        return out[:, 0] if x.dim() == 1 else out

    def views(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """(1 + n, N, ...) x: (T, ...) laid out as a context's views: the global view, then every block's slots."""
        return torch.cat([self.global_view(x).to(x.dtype)[None], x[slots.to(x.device)]])


def region_context(layout: RegionLayout, scores: torch.Tensor | None = None, index: int = 0, **inputs) -> ImageContext:
    """The ``ImageContext`` of one image: row 0 the global view (scores pooled), then the blocks (``valid``: a
    block's real slots), raster ``stock_order``, no newlines, the global view never emitted, no [CLS].

    scores: (T,) float32 per merged token or None (zeros); inputs: per-token (T, ...) tensors named as the
    context's fields (features, hidden, keys, tower_features) laid out the same way, or per-image ones (text).
    """
    device = None if scores is None else scores.device
    slots, valid = layout.slots(device)
    if scores is None:
        scores = torch.zeros(layout.n_tokens)
    s = layout.side
    ctx_scores = layout.views(scores.float(), slots)
    ctx_scores[1:] = ctx_scores[1:].masked_fill(~valid, 0.0)
    for name in ("features", "hidden", "keys", "tower_features"):
        if inputs.get(name) is not None:
            inputs[name] = layout.views(inputs[name], slots)
    if inputs.get("features") is not None:
        inputs.setdefault("newline", inputs["features"].new_zeros(inputs["features"].shape[-1]))  # never addressed
    return ImageContext(
        scores=ctx_scores, side=s, grid=layout.grid, valid=valid, box=None, image_index=index,
        region_weights=core.crop_region_weights(s, layout.grid, device=device),
        stock_order=layout.stock_order(device), newlines=False, thumbnail_emitted=False, cls_token=False, **inputs,
    )  # fmt: skip


def context_to_stock(layout: RegionLayout, device=None) -> torch.Tensor:
    """(V N,) long: the merged token each context slot holds (-1: the global view and empty slots)."""
    slots, valid = layout.slots(device)
    n_tok = layout.side**2
    out = torch.full((n_tok * (1 + slots.shape[0]),), -1, dtype=torch.long, device=device)
    out[n_tok:] = torch.where(valid, slots, torch.full_like(slots, -1)).reshape(-1)
    return out


# ----------------------------------------------------------------------------------- the tower's pass


@dataclass
class TowerPass:
    """One pass of the stock vision tower over a call's images, and what the method asked to be read off it.

    Per image (stock merged tokens, raster order): features (N_i, D_llm) exactly as stock computes them;
    deepstack [level][image] (N_i, D_llm) (Qwen3-VL) or None; scores (N_i,) float32; hidden (N_i, D') the
    vision-space row the family's merger(s) turn into this token (its m x m patches of the last block, and of
    every DeepStack block on Qwen3-VL, concatenated) or None; keys (N_i, d_head) or None; tower (N_i, D_vis)
    the mean of its m x m patches of the last block, or None.
    """

    features: list[torch.Tensor]
    deepstack: list[list[torch.Tensor]] | None
    scores: list[torch.Tensor]
    hidden: list[torch.Tensor] | None = None
    keys: list[torch.Tensor] | None = None
    tower: list[torch.Tensor] | None = None


def _capture_output(block: nn.Module, seen: dict, key: str):
    def hook(_m, _args, out):
        seen[key] = out[0] if isinstance(out, tuple) else out

    return block.register_forward_hook(hook)


@dataclass(frozen=True)
class TowerReadout:
    """What a tower pass must capture for ``scorer`` and ``needs``, and how to read it (``read_tower_pass``).

    score_block: the block index whose input (attention_received, keys) or output (global_dissimilarity) is
    read; deep_blocks: the DeepStack blocks whose outputs ``hidden`` needs (Qwen3-VL), in level order.
    """

    scorer: str | None
    score_block: int
    needs: frozenset
    deep_blocks: tuple[int, ...]

    @classmethod
    def of(cls, n_blocks: int, deepstack_indexes, scorer: str | None = None, layer: int | None = -1,
           needs: frozenset = frozenset()) -> TowerReadout:  # fmt: skip
        """The readout of a tower of ``n_blocks`` blocks (``layer``: a hidden-state index, -1 the last block)."""
        idx = HiddenIndex.of(-1 if layer is None else layer, n_blocks).layer
        deep = tuple(int(b) for b in (deepstack_indexes or ())) if "hidden" in needs else ()
        return cls(scorer, idx, frozenset(needs), deep)

    @property
    def wants_input(self) -> bool:
        """Whether the score block's input is read (attention_received, VisionZip's keys)."""
        return self.scorer == "attention_received" or "keys" in self.needs

    @property
    def wants_output(self) -> bool:
        """Whether the score block's output is read (global_dissimilarity)."""
        return self.scorer == "global_dissimilarity"


def tower_hooks(blocks: Sequence[nn.Module], readout: TowerReadout, seen: dict, block_input=None,
                block_output=None) -> list:  # fmt: skip
    """Register on ``blocks`` the hooks ``readout`` needs, filling ``seen`` ("last", "input", "output",
    "deep{j}"); returns the handles (remove them last first). block_input / block_output: the factories
    ``(block, seen, key) -> handle`` that capture a block's input / output (default: module hooks on the HF
    blocks, ``capture_block_input`` and ``_capture_output``)."""
    block_input, block_output = block_input or capture_block_input, block_output or _capture_output
    handles = [block_output(blocks[-1], seen, "last")]
    if readout.wants_input:
        handles.append(block_input(blocks[readout.score_block], seen, "input"))
    if readout.wants_output:
        handles.append(block_output(blocks[readout.score_block], seen, "output"))
    for j, b in enumerate(readout.deep_blocks):
        handles.append(block_output(blocks[b], seen, f"deep{j}"))
    return handles


def read_tower_pass(
    readout: TowerReadout, seen: dict, score_block: nn.Module, features: list[torch.Tensor],
    deepstack: list[list[torch.Tensor]] | None, order: torch.Tensor, merge_size: int,
) -> TowerPass:  # fmt: skip
    """The ``TowerPass`` of one tower run, from what ``tower_hooks`` captured in ``seen`` (tower order) and the
    run's per-image features / DeepStack rows. order: ``patch_order`` of the run; score_block: the block whose
    q/k ``attention_received`` / keys recompute (the model's own, or a stand-in with its weights)."""
    counts = [f.shape[0] for f in features]
    unit = int(merge_size) ** 2
    flat = lambda x: x.reshape(x.shape[0], -1) if x.dim() == 3 else x  # noqa: E731 - (S, 1, D) vLLM rows

    def grouped(x: torch.Tensor) -> torch.Tensor:  # (S, ...) tower order -> (sum N, m^2, ...) processor order
        x = to_processor_order(flat(x), order)
        return x.reshape(-1, unit, *x.shape[1:])

    with torch.no_grad():
        if readout.scorer == "attention_received":
            received, size = attention_received(score_block, seen["input"])
            scores = grouped(received * size.float()).mean(1)  # (sum N,) mean relative attention of its patches
            per_image = list(scores.split(counts))
        elif readout.scorer == "global_dissimilarity":
            tokens = grouped(seen["output"].float()).mean(1)  # (sum N, D)
            per_image = [scoring.global_dissimilarity(t[None])[0] for t in tokens.split(counts)]
        else:
            per_image = [torch.zeros(c, device=features[0].device) for c in counts]
    last = grouped(seen["last"])  # (sum N, m^2, D_vis) the merger's input groups
    result = TowerPass(features, deepstack, per_image)
    needs = readout.needs
    if "hidden" in needs:
        parts = [last.flatten(1)] + [grouped(seen[f"deep{j}"]).flatten(1) for j in range(len(readout.deep_blocks))]
        result.hidden = list(torch.cat(parts, dim=1).split(counts))
    if "keys" in needs:
        with torch.no_grad():
            _, k = block_qk(score_block, seen["input"], rotary=False)  # (H, S, hd) content keys
            result.keys = list(grouped(k.mean(0)).mean(1).split(counts))  # (N_i, hd)
    if "tower" in needs:
        result.tower = list(last.mean(1).split(counts))
    return result


def tower_pass(
    model: nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, scorer: str | None = None,
    layer: int = -1, needs: frozenset = frozenset(),
) -> TowerPass:  # fmt: skip
    """Run the model's own vision path once (``get_image_features``) and read what ``scorer`` and ``needs`` ask
    for off the blocks with hooks (no second pass): ``tower_hooks`` + ``read_tower_pass``.

    scorer: "attention_received" (block ``layer``'s attention, recomputed from its input, each patch relative
    to uniform attention over its segment: received x segment size, so 1 = an even share, comparable across
    Qwen2.5-VL's windows and across images), "global_dissimilarity" (minus the cosine of each token's patch
    mean of the layer's output to the image's mean token), or None (zeros).
    layer: a hidden-state index like ``vision_feature_layer`` (-1: the last block, whose output the merger
    takes). needs: "hidden", "keys" (VisionZip), "tower" (DivPrune's Qwen port).
    """
    base = base_model(model)
    vis = base.visual
    blocks = vis.blocks
    readout = TowerReadout.of(len(blocks), getattr(vis, "deepstack_visual_indexes", None), scorer, layer, needs)
    grid = torch.as_tensor(image_grid_thw).long().reshape(-1, 3)
    seen: dict = {}
    handles = tower_hooks(blocks, readout, seen)
    try:
        out = base.get_image_features(pixel_values, grid, return_dict=True)
    finally:
        for h in reversed(handles):
            h.remove()
    feats = list(out.pooler_output)
    counts = [f.shape[0] for f in feats]
    deep = getattr(out, "deepstack_features", None)
    deepstack = None
    if deep is not None:  # transformers >= 5.x splits each level per image; 5.0 leaves one tensor per level
        deepstack = [list(lv.split(counts)) if isinstance(lv, torch.Tensor) else list(lv) for lv in deep]
    order = patch_order(model, grid)
    return read_tower_pass(readout, seen, blocks[readout.score_block], feats, deepstack, order, vis.spatial_merge_size)


# ----------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class QwenImageTokens:
    """What ``QwenAdapter.pack`` needs of one image beside its features: its ``image_grid_thw`` row, the stock
    token whose position (and DeepStack slot) each feature row takes, and its DeepStack rows (Qwen3-VL)."""

    grid_thw: torch.Tensor  # (3,) long
    index: torch.Tensor  # (K,) long, ascending: stock merged token of each row
    deepstack: list[torch.Tensor] | None  # per level (K, D_llm), or None


@dataclass
class QwenImageRecord(ImageRecord):
    """``ImageRecord`` of a Qwen-VL image; ``image_size`` is the size the tower saw (after the processor's resize).

    Also: the region layout, the patch geometry (for drawing: ``QwenAdapter.view_pixels``) and the tokens for
    ``pack`` (``tokens``).
    """

    layout: RegionLayout | None = None
    patch_size: int = 0
    merge_size: int = 0
    temporal_patch_size: int = 0
    tokens: QwenImageTokens | None = None


class QwenImageBatch(ImageBatch):
    """``ImageBatch`` of a Qwen-VL call (unpacks as one) with ``extras``: per image the ``QwenImageTokens`` that
    ``QwenAdapter.pack`` needs beside the features."""

    extras: list[QwenImageTokens]

    @classmethod
    def of(cls, features, stock_counts, records, extras: list[QwenImageTokens]) -> QwenImageBatch:
        """The batch, with ``extras`` attached."""
        batch = cls(features, stock_counts, records)
        batch.extras = extras
        return batch


@dataclass
class QwenPackedInputs(PackedInputs):
    """``PackedInputs`` of a Qwen-VL call: position_ids are the kept tokens' stock (3, B, L') M-RoPE positions;
    ``qwen`` holds what ``lm_call_context`` hands the language model (decode positions, rope_deltas, DeepStack)."""

    qwen: QwenPacked | None = None


# -------------------------------------------------------------------------------------------- adapter

#: Table I of the GlobalCom² paper studies which AnyRes views reach the LLM; Qwen-VL has no such views
NO_VIEWS = (
    "it is the GlobalCom² paper's input study of AnyRes views (thumbnail vs crops, Table I), and {name} has no "
    "thumbnail and no crops: one native-resolution view per image; use globalcom2 (with the regions of its "
    "no-thumbnail extension) or any token-selecting method"
)
TABLE_I = ("thumbnail_only", "crops_only", "drop_random_crop", "drop_important_crop", "drop_unimportant_crop")
#: the processor's / the call's vision arguments the patched model consumes (none reaches the stock call)
QWEN_VISION_KWARGS = ("image_grid_thw", "mm_token_type_ids", "pixel_values_videos", "video_grid_thw",
                      "second_per_grid_ts")  # fmt: skip


def check_config(cfg) -> None:
    """Raise a clear error unless ``cfg`` gives the geometry the Qwen adapters read (positive patch, merge and
    temporal patch sizes) and the image placeholder token."""
    vc = cfg.vision_config
    for name in ("patch_size", "spatial_merge_size", "temporal_patch_size"):
        value = getattr(vc, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"config.vision_config.{name} must be a positive int, got {value!r}")
    if getattr(cfg, "image_token_id", None) is None:
        raise ValueError("config.image_token_id must name the <|image_pad|> token, got None")


def check_tower(model: nn.Module, classes: tuple[str, ...], tower: str, merger_parts: tuple[str, ...]) -> None:
    """Raise a clear error unless ``model`` is one of ``classes`` with a vision tower whose blocks have ``norm1``
    and a fused ``attn.qkv`` and whose merger has ``merger_parts``."""
    check_class(model, classes)
    check_config(model.config)
    visual = getattr(model.model, "visual", None)
    blocks = getattr(visual, "blocks", None)
    last = blocks[-1] if blocks is not None and len(blocks) else None
    if last is None or not hasattr(last, "norm1") or not hasattr(getattr(last, "attn", None), "qkv"):
        raise TypeError(
            f"the vision tower must be {tower} (visual.blocks[i] with norm1 and a fused attn.qkv); "
            f"got {type(visual).__name__}"
        )
    merger = getattr(visual, "merger", None)
    if not all(hasattr(merger, part) for part in merger_parts):
        raise TypeError(f"the vision merger must have {', '.join(merger_parts)}; got {type(merger).__name__}")


def family_compress(adapter):
    """A family file's ``compress(model, cfg, pixel_values, image_sizes=None, input_ids=None, attention_mask=None,
    **vision_kwargs) -> Compressed`` running ``adapter()``'s ``compress_qwen`` (``image_grid_thw`` in
    ``vision_kwargs``; ``image_sizes`` unused: Qwen's inputs give the grid)."""

    def compress(model, cfg, pixel_values, image_sizes=None, input_ids=None, attention_mask=None, **vision_kwargs):
        """Per image, the kept visual tokens in stock raster order and a ``QwenImageRecord`` (its ``tokens``: the
        stock token each takes the place of, and its DeepStack rows)."""
        return adapter().compress_qwen(model, cfg, pixel_values, vision_kwargs, input_ids, attention_mask)

    return compress


def unsupported(display_name: str) -> dict[str, str]:
    """The registered methods that cannot run on a Qwen-VL family, with the reason: Table I's view subsets."""
    return {name: NO_VIEWS.format(name=display_name) for name in TABLE_I}


class QwenAdapter(FamilyAdapter):
    """What Qwen2.5-VL and Qwen3-VL share: native dynamic resolution (``image_grid_thw``), 2 x 2 (``m x m``)
    spatial merge, no [CLS], no thumbnail, M-RoPE positions. Subclasses name the classes and the tower."""

    vision_kwargs = QWEN_VISION_KWARGS
    has_cls = False
    default_scorer = "attention_received"
    #: the authors' Qwen2.5-VL code paths: DART's TOPK rule, the DivPrune port's tower features
    auto_options = {"dart": {"topk_rule": "qwen2_5_vl"}, "divprune": {"space": "tower"}}

    # -- validation ------------------------------------------------------------------------------

    def check_call(self, model: nn.Module, kwargs: dict) -> None:
        """Video inputs are refused: the adapter compresses images (its regions are per image)."""
        for name in ("pixel_values_videos", "video_grid_thw"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"{name}: video inputs are not supported by globalcom2 on {self.display_name} (it compresses "
                    "images); call globalcom2.remove(model) for videos, or pass images"
                )

    def resolve(self, cfg: MethodConfig, config) -> MethodConfig:
        """As ``FamilyAdapter.resolve``, then: crop layouts run as "spatial" (no newlines, stock order);
        CDPruner's budget runs as "exact" (there is no letterbox padding: candidates are the region's tokens);
        ``composed`` with the VisionZip selector is refused (its merged tokens have no stock position here)."""
        if cfg.name == "composed" and getattr(cfg, "selector", None) == "visionzip":
            raise ValueError(
                f"method 'composed' with selector='visionzip' does not run on {self.display_name}: the selector "
                "appends merged contextual tokens after the crops, which have no stock M-RoPE position here; use "
                "method='visionzip' (its contextual tokens take their target's place) or another selector"
            )
        cfg = super().resolve(cfg, config)
        names = cfg.option_names()
        if "layout" in names and cfg.layout != "spatial":
            cfg = dataclasses.replace(cfg, layout="spatial")
        if cfg.name == "cdpruner" and cfg.budget != "exact":
            cfg = dataclasses.replace(cfg, budget="exact")
        return cfg

    # -- inputs ----------------------------------------------------------------------------------

    def check_inputs(self, model: nn.Module, pixel_values, vision_kwargs: dict) -> torch.Tensor:
        """Validate the processor's image outputs; returns ``image_grid_thw`` as (n, 3) long (t = 1 each)."""
        check_pixel_values(pixel_values)
        raw = vision_kwargs.get("image_grid_thw")
        if raw is None:
            raise ValueError(
                "image_grid_thw is required with pixel_values: pass the processor's output unchanged (it returns "
                "image_grid_thw, the (t, h, w) patch grid of every image)"
            )
        grid = torch.as_tensor(raw.cpu()) if isinstance(raw, torch.Tensor) else None
        if grid is None or grid.dim() != 2 or grid.shape[1] != 3 or not grid.numel() or grid.is_floating_point():
            got = f"shape {tuple(grid.shape)}" if grid is not None else type(raw).__name__
            raise ValueError(f"image_grid_thw must be the processor's (number of images, 3) int tensor, got {got}")
        grid = grid.long()
        vc = model.config.vision_config
        m = int(vc.spatial_merge_size)
        if bool((grid <= 0).any()) or bool(((grid[:, 1:] % m) != 0).any()):
            raise ValueError(
                f"image_grid_thw must hold positive (t, h, w) with h and w multiples of spatial_merge_size {m}, got "
                f"{grid.tolist()}"
            )
        if bool((grid[:, 0] != 1).any()):
            raise ValueError(
                f"image_grid_thw must have t = 1 for every image (images only; videos are refused), got {grid.tolist()}"
            )
        width = int(getattr(vc, "in_channels", 3)) * int(vc.temporal_patch_size) * vc.patch_size**2
        rows = int(grid.prod(1).sum())
        if pixel_values.dim() != 2 or tuple(pixel_values.shape) != (rows, width):
            raise ValueError(
                f"pixel_values must be ({rows}, {width}) for this image_grid_thw (one row of C x temporal x patch x "
                f"patch values per patch, every image's patches in turn), got shape {tuple(pixel_values.shape)}; "
                "pass both from the same processor call"
            )
        return grid

    def stock_counts(self, model, pixel_values, vision_kwargs, input_ids=None) -> list[int]:
        """``h w / m^2`` merged tokens per image."""
        grid = self.check_inputs(model, pixel_values, vision_kwargs)
        return merged_grid_thw(grid, model.config).prod(1).tolist()

    def stock_features(self, model, pixel_values, vision_kwargs, input_ids=None) -> list[torch.Tensor]:
        """The merged tokens stock feeds its LLM, per image (raster order)."""
        grid = self.check_inputs(model, pixel_values, vision_kwargs)
        return tower_pass(model, pixel_values, grid).features

    # -- the vision side -------------------------------------------------------------------------

    def project_rows(self, model: nn.Module, rows: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """(M, D_llm) LLM tokens (and per DeepStack level (M, D_llm), Qwen3-VL) of vision-space rows (M, D') laid
        out as ``TowerPass.hidden`` (a merged token's patches, concatenated), through the model's mergers."""
        raise NotImplementedError  # pragma: no cover - each family

    def prepare_images(self, model, cfg, pixel_values, vision_kwargs, input_ids=None, attention_mask=None):
        """As ``FamilyAdapter.prepare_images``, a ``QwenImageBatch``: per image also the ``QwenImageTokens`` ``pack``
        needs."""
        grid = self.check_inputs(model, pixel_values, vision_kwargs)
        counts = merged_grid_thw(grid, model.config).prod(1).tolist()
        if cfg.where == "llm":
            tp = tower_pass(model, pixel_values, grid)
            extras = [
                QwenImageTokens(g, torch.arange(c), None if tp.deepstack is None else [lv[i] for lv in tp.deepstack])
                for i, (g, c) in enumerate(zip(grid, counts))
            ]
            return QwenImageBatch.of(tp.features, counts, None, extras)
        feats, records = self.compress(model, cfg, pixel_values, vision_kwargs, input_ids, attention_mask)
        return QwenImageBatch.of(feats, counts, records, [r.tokens for r in records])

    def compress_qwen(
        self, model: nn.Module, cfg: MethodConfig, pixel_values, vision_kwargs: dict, input_ids=None,
        attention_mask=None,
    ) -> Compressed:  # fmt: skip
        """Per image, the kept visual tokens (stock order) and a ``QwenImageRecord`` (the family's ``compress``)."""
        cfg = self.resolve(cfg, model.config)
        grid = self.check_inputs(model, pixel_values, vision_kwargs)
        if "text" in cfg.needs and input_ids is None:
            raise ValueError(
                f"method {cfg.name!r} ranks visual tokens against the prompt's text: pass input_ids (and "
                "attention_mask) with pixel_values"
            )
        req = cfg.requires
        tp = tower_pass(model, pixel_values, grid, self.scorer(cfg), req.score_layer, cfg.needs)
        texts = None
        if "text" in cfg.needs:
            texts = text_embeddings(
                model, input_ids, attention_mask, merged_grid_thw(grid, model.config).prod(1).tolist()
            )
        return self.select_pass(model, cfg, tp, grid, texts)

    def select_pass(self, model: nn.Module, cfg: MethodConfig, tp: TowerPass, grid: torch.Tensor,
                    texts: list[torch.Tensor] | None = None) -> Compressed:  # fmt: skip
        """Per image of one tower pass, the kept tokens (stock order) and a ``QwenImageRecord``: the regions'
        context, ``cfg.select``, ``cfg.order`` and the emission at stock positions. ``cfg`` resolved; grid:
        (n, 3) ``image_grid_thw``; texts: per image the prompt's text embeddings (methods that need "text");
        model: what ``project_rows`` reads (``config`` and the tower's mergers: a stock model, or vLLM's).
        Every engine that runs a Qwen-VL tower selects through here (the HF patch and the vLLM plugin)."""
        vc = model.config.vision_config
        merged = merged_grid_thw(grid, model.config)
        feats, records = [], []
        for i, (g, (_, h, w)) in enumerate(zip(grid, merged.tolist())):  # loop over images
            layout = RegionLayout.of((h, w))
            inputs = {}
            if "features" in cfg.needs:
                inputs["features"] = tp.features[i]
            for need, value in (("hidden", tp.hidden), ("keys", tp.keys), ("tower", tp.tower)):
                if value is not None:
                    inputs["tower_features" if need == "tower" else need] = value[i]
            if "text" in cfg.needs:
                inputs["text"] = texts[i]
            ctx = region_context(layout, tp.scores[i], index=i, **inputs)
            sel = cfg.select(ctx)
            context_order = cfg.order(sel, ctx)
            f, tokens, order = self._emit(model, cfg, ctx, layout, sel, context_order, tp, i, g)
            rec = QwenImageRecord(
                (int(g[1]) * vc.patch_size, int(g[2]) * vc.patch_size), layout.grid, layout.side, ctx.valid, sel,
                order, ctx.scores, kept_views(context_order, ctx), 1, layout=layout, patch_size=int(vc.patch_size),
                merge_size=int(vc.spatial_merge_size), temporal_patch_size=int(vc.temporal_patch_size), tokens=tokens,
            )  # fmt: skip
            feats.append(f)
            records.append(rec)
        return Compressed(feats, records)

    def _emit(self, model, cfg: MethodConfig, ctx: ImageContext, layout: RegionLayout, sel,
              context_order: torch.Tensor, tp: TowerPass, i: int, grid_thw: torch.Tensor):  # fmt: skip
        """(features (K, D), QwenImageTokens, order (K,) into concat(stock tokens, projected extras)) of one image:
        the kept tokens in stock (raster) order, each method-made token at the stock token it stands for."""
        stock_feats = tp.features[i]
        dev = stock_feats.device
        n_ctx = ctx.scores.numel()
        to_stock = context_to_stock(layout, context_order.device)
        real = context_order < n_ctx
        at = to_stock[context_order[real]]  # (k,) stock token of every kept context token
        if bool((at < 0).any()):
            raise ValueError(f"method {cfg.name!r} kept a slot that holds no token (a region's empty slot)")
        extra_rows = context_order[~real] - (n_ctx + 1)  # (M,) rows of sel.extra, in emission order
        position, source = at, at.new_empty(0)  # stock token each emitted row stands at; extra rows' sources
        deep = None if tp.deepstack is None else [lv[i] for lv in tp.deepstack]
        src_feats, src_deep = stock_feats, deep
        if extra_rows.numel():
            if sel.extra_at is None:
                raise ValueError(
                    f"{self.display_name} gives every token a stock position: a method's extra tokens must say whose "
                    "place they take (Selection.extra_at)"
                )
            proj, proj_deep = self.project_rows(model, sel.extra.to(dev, stock_feats.dtype))
            src_feats = torch.cat([stock_feats, proj.to(stock_feats.dtype)])
            if deep is not None:
                src_deep = [torch.cat([d, pd.to(d.dtype)]) for d, pd in zip(deep, proj_deep)]
            anchors = to_stock[sel.extra_at.to(to_stock.device)[extra_rows.to(to_stock.device)]]
            position = torch.cat([at, anchors])
            source = extra_rows.to(at.device) + stock_feats.shape[0]
        index_src = torch.cat([at, source])  # (K,) row of concat(stock, extras) of every emitted token
        perm = torch.argsort(position, stable=True)
        position, order = position[perm], index_src[perm]
        if bool((position[1:] == position[:-1]).any()):
            raise ValueError("two emitted tokens would take the same stock position")
        order_dev = order.to(dev)
        feats = src_feats[order_dev]
        deep_rows = None if src_deep is None else [d[order_dev] for d in src_deep]
        return feats, QwenImageTokens(grid_thw, position.cpu(), deep_rows), order

    def geometry_context(self, cfg: MethodConfig, config, image_size: tuple[int, int], processor=None) -> ImageContext:
        """Zero-score context of one image of (height, width) as ``processor`` resizes it (required)."""
        merged = resize_rule(processor, config, self.display_name).merged(image_size)
        return region_context(RegionLayout.of(merged))

    def stock_token_count(self, config, image_size: tuple[int, int], processor=None) -> int:
        """``H W`` merged tokens of the resized image (``processor`` required)."""
        h, w = resize_rule(processor, config, self.display_name).merged(image_size)
        return h * w

    # -- the language-model side -----------------------------------------------------------------

    def pack(self, model, input_ids, attention_mask, features, stock_counts, labels=None, padding_side="left",
             batch=None) -> QwenPackedInputs:  # fmt: skip
        """``pack_qwen``: every kept token at its stock M-RoPE position, DeepStack rows alike; needs ``batch``."""
        if not isinstance(batch, QwenImageBatch):
            raise TypeError(f"{self.display_name}'s pack needs the call's QwenImageBatch (batch=, from prepare_images)")
        tokens = batch.extras
        grid = torch.stack([t.grid_thw for t in tokens])
        deep = None
        if tokens[0].deepstack is not None:
            deep = [[t.deepstack[level] for t in tokens] for level in range(len(tokens[0].deepstack))]
        pk = pack_qwen(
            model, input_ids, attention_mask, grid, features, [t.index for t in tokens], deep,
            padding_side=padding_side, labels=labels,
        )  # fmt: skip
        return QwenPackedInputs(pk.inputs_embeds, pk.attention_mask, pk.position_ids, pk.labels, pk.image_spans, pk)

    def lm_call_context(self, model: nn.Module, packed: PackedInputs):
        """``packed_lm_inputs``: the prefill's and every decode step's 3-D positions, ``rope_deltas``, DeepStack."""
        if not isinstance(packed, QwenPackedInputs) or packed.qwen is None:
            return contextlib.nullcontext()
        return packed_lm_inputs(model, packed.qwen)

    # -- tools -----------------------------------------------------------------------------------

    def view_pixels(self, pixel_values: torch.Tensor, rec: ImageRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """(global view (C, S mp, S mp): the resized image squashed to one view; blocks (n, C, S mp, S mp): each
        region's pixels at the top-left, zeros elsewhere) of the first image of the processor's flat patches."""
        lay, p, m, t = rec.layout, rec.patch_size, rec.merge_size, rec.temporal_patch_size
        (hm, wm), s = lay.merged, lay.side
        gh, gw = hm * m, wm * m
        c = pixel_values.shape[1] // (t * p * p)
        x = pixel_values[: gh * gw].float().view(hm, wm, m, m, c, t, p, p)[:, :, :, :, :, 0]  # (hm, wm, m, m, C, p, p)
        img = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(c, gh * p, gw * p)  # (C, H px, W px)
        unit = m * p  # pixels per merged token
        thumb = F.interpolate(img[None], size=(s * unit, s * unit), mode="bilinear", align_corners=False)[0]
        crops = img.new_zeros(lay.grid[0] * lay.grid[1], c, s * unit, s * unit)
        for r, (a, b) in enumerate(zip(lay.row_edges, lay.row_edges[1:])):  # blocks, never tokens
            for q, (e, f) in enumerate(zip(lay.col_edges, lay.col_edges[1:])):
                block = img[:, a * unit : b * unit, e * unit : f * unit]
                crops[r * lay.grid[1] + q, :, : block.shape[1], : block.shape[2]] = block
        return thumb, crops
