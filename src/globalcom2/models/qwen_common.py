"""Qwen2.5-VL / Qwen3-VL machinery: merged-grid geometry, stock visual features, and packing a shortened
prompt whose kept visual tokens keep their ORIGINAL 3-D M-RoPE positions.

Pure of any other globalcom2 model family. Works on stock ``Qwen2_5_VLForConditionalGeneration`` and
``Qwen3VLForConditionalGeneration`` (or their ``.model``), transformers 5.x. Notes with file/line
references: ``docs/qwen-notes.md``.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
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


def vision_attention_received(
    model, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, layer: int = -1
) -> QwenAttentionScores:
    """Recompute block ``layer``'s attention from its input and score each patch by the attention it receives:
    mean over heads and over the queries of its attention segment (an image for full-attention blocks and
    Qwen3-VL; a window for Qwen2.5-VL's windowed blocks) of softmax(q k^T / sqrt(d)), so each segment's
    scores sum to 1. Tokens get the sum over their m x m patches. q/k come from the block's own fused ``qkv``
    linear after ``norm1`` and the 2-D vision rotary embedding, as in the stock block; softmax in float32.
    """
    import sys

    base = base_model(model)
    vis = base.visual
    depth = len(vis.blocks)
    idx = layer % depth
    blk = vis.blocks[idx]
    seen = {}

    def hook(_m, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["cu"] = kwargs["cu_seqlens"]
        seen["pe"] = kwargs["position_embeddings"]

    handle = blk.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            base.get_image_features(pixel_values, image_grid_thw)
    finally:
        handle.remove()
    h, cu, (cos, sin) = seen["h"], seen["cu"].long(), seen["pe"]
    rope = sys.modules[type(blk.attn).__module__].apply_rotary_pos_emb_vision
    with torch.no_grad():
        seq = h.shape[0]
        heads = blk.attn.num_heads
        q, k, _ = blk.attn.qkv(blk.norm1(h)).reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)  # (S, H, hd)
        q, k = rope(q, k, cos, sin)
        q, k = q.float().transpose(0, 1), k.float().transpose(0, 1)  # (H, S, hd)
        received = torch.zeros(seq, dtype=torch.float32, device=h.device)  # (S,) tower order
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):  # loop over attention segments (windows / images)
            if b == a:
                continue
            probs = torch.softmax(q[:, a:b] @ k[:, a:b].transpose(1, 2) * blk.attn.scaling, dim=-1)  # (H, n, n)
            received[a:b] = probs.mean(dim=(0, 1))  # (n,) mean over heads and queries
    order = patch_order(model, image_grid_thw).to(received.device)
    stock = torch.empty_like(received)
    stock[order] = received  # processor (block-major) order
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
        raise ValueError("a prompt row would reach the language model with no token at all")
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
    )


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

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


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

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


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
