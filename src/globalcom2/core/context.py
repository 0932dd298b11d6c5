"""What a method sees and returns: the per-image context, the selection, and the in-LLM stage records.

Pure dataclasses (no model import), shared by the methods, the model adapters and the serving glue.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class ImageContext:
    """Everything a vision-side method may look at for one image.

    scores: (1 + n, N) float32 [CLS] importance of every token of every view; row 0 is the thumbnail.
    side:   S, tokens per side of one view (N = S * S).
    grid:   (nph, npw) crops per column / per row.
    valid:  (n, N) bool, crop tokens that survive LLaVA-NeXT's unpadding.
    box:    (top, bottom, left, right) grid-space bounds of ``valid``, or None; it tells the rows of an
            image so thin that no column survives, which still get stock's newlines.
    image_index: position of the image in the batch (seeds the random baseline).

    Optional inputs, filled by the adapter only when the method lists them in ``needs`` (so a
    method that ranks by [CLS] scores alone pays nothing for them):

    features: (1 + n, N, D_llm) projected visual features of every view (``"features"``).
    newline:  (D_llm,) the model's image-newline embedding (given with ``"features"``).
    hidden:   (1 + n, 1 + N, D_vis) vision hidden states of the feature layer, [CLS] first; the
              projector of the model turns rows of it into LLM tokens (``"hidden"``).
    keys:     (1 + n, 1 + N, d_head) keys of the score layer averaged over heads, [CLS] first (``"keys"``).
    text:     (M, D_llm) the language model's input embeddings of the prompt's text tokens, M >= 0 (``"text"``).

    Set by adapters whose family differs from LLaVA-NeXT (None keeps LLaVA-NeXT's rules):

    region_weights: (n, N) float64 area of each thumbnail token over each crop's region
              (``core.crop_region_weights``), for grids that do not divide the thumbnail's side.
    stock_order: (T,) long, the family's stock visual sequence as indices into ``concat(views.flatten(0, 1))``
              (``stock_sequence`` then ignores LLaVA-NeXT's layout and newline).
    newlines: False for families whose LLM input has no newline tokens (InternVL): ``order`` then never
              emits the newline index, and counts leave it out.
    thumbnail_emitted: False where row 0 is a global view the library builds itself and the model has no
              thumbnail tokens to emit (Qwen-VL: the merged token grid pooled to S x S): its scores still
              guide the method (GlobalCom²'s crop budgets), but ``order`` never emits its tokens and counts
              leave them out, so the retention ratio applies to the crops' tokens.
    cls_token: False where ``hidden``/``keys`` have no [CLS] row (towers without one): (V, N, D) then.
    tower_features: (1 + n, N, D_vis) the vision tower's own vector of every token before the projector,
              where the family defines one (Qwen-VL: the mean of a merged token's m x m patches of the last
              block, what the DivPrune Qwen2.5-VL port measures diversity on) (``"tower"``).
    """

    scores: torch.Tensor
    side: int
    grid: tuple[int, int]
    valid: torch.Tensor
    box: tuple[int, int, int, int] | None = None
    image_index: int = 0
    features: torch.Tensor | None = None
    newline: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text: torch.Tensor | None = None
    region_weights: torch.Tensor | None = None
    stock_order: torch.Tensor | None = None
    newlines: bool = True
    thumbnail_emitted: bool = True
    cls_token: bool = True
    tower_features: torch.Tensor | None = None

    @property
    def thumbnail(self) -> torch.Tensor:
        """(N,) thumbnail scores."""
        return self.scores[0]

    @property
    def crops(self) -> torch.Tensor:
        """(n, N) crop scores."""
        return self.scores[1:]


@dataclass
class Selection:
    """What a vision-side method keeps of one image.

    thumb_keep:  (k0,) long, thumbnail token indices in the order they are emitted.
    crop_keep:   (n, N) bool, kept crop tokens at their true positions.
    crop_ratios: (n,) float64, retention ratio each crop was given.
    extra:       optional (M, D_vis) vision-space tokens (merged or [CLS] tokens) that the adapter
                 projects and appends to the source; ``order`` addresses row m as ``(1 + n) * N + 1 + m``.
    order:       optional (T,) long, the emission order when the method decides it itself (see ``order``).
    extra_at:    optional (M,) long, for each ``extra`` row the context index (view * N + slot) of the token
                 whose place it takes (VisionZip's contextual token stands at its target), for families whose
                 tokens carry their own positions (Qwen-VL's M-RoPE); None: the rows are simply appended.
    """

    thumb_keep: torch.Tensor
    crop_keep: torch.Tensor
    crop_ratios: torch.Tensor
    extra: torch.Tensor | None = None
    order: torch.Tensor | None = None
    extra_at: torch.Tensor | None = None


@dataclass
class Stage:
    """What a method decided at one pruning layer, row by row (lengths may differ per row)."""

    hidden: list[torch.Tensor]  # per row (L_b, D) new hidden states
    positions: list[torch.Tensor]  # per row (L_b,) rotary positions
    visual: list[torch.Tensor]  # per row (L_b,) bool, which entries are (still) visual tokens
    #: per row (L_b,) long, the index in the stage's input row of each entry, -1 for an entry the method made
    #: (SparseVLM's recycled clusters); lets the driver carry per-token side inputs (Qwen3-VL's DeepStack)
    sources: list[torch.Tensor] | None = None


@dataclass
class PruneContext:
    """What a method sees at a pruning layer.

    hidden: (B, L, D) input of layer ``layer_idx`` on the current sequence;
    key_mask: (B, L) bool real (non-padding) tokens; positions: (B, L) each token's 1-D position, the rank of
        its prompt token among the row's attended tokens (the rotary position itself for 1-D RoPE; for
        M-RoPE models the driver maps it back to the token's 3-D position);
    visual: (B, L) bool visual tokens;
    probs: callable(query positions (B, Q)) -> (B, H, Q, L) attention of layer ``layer_idx - 1``;
    n_visual_full: (B,) visual tokens of each row before any pruning;
    prompt: the language model's input at prefill, (embeds (B, L0, D), key mask (B, L0), visual (B, L0),
        positions (B, L0)), before any pruning;
    num_layers: decoder layers of the language model;
    keys: callable() -> (B, Hkv, L, hd) float32 rotary-embedded keys of layer ``layer_idx - 1`` on the current
        sequence (its own ``k_proj`` output, captured as it ran), or None;
    norm: the language model's final norm (applied to ``hidden`` by methods that compare normed states), or None.
    """

    layer_idx: int
    stage: int
    hidden: torch.Tensor
    key_mask: torch.Tensor
    positions: torch.Tensor
    visual: torch.Tensor
    probs: Callable[[torch.Tensor], torch.Tensor]
    n_visual_full: torch.Tensor
    prompt: tuple | None = None
    num_layers: int = 0
    keys: Callable[[], torch.Tensor] | None = None
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None


def canonical_selection(ctx: ImageContext, k0: int, k: torch.Tensor) -> Selection:
    """A content-free selection with ``k0`` thumbnail tokens and the first ``k[j]`` unpadded tokens of crop j.

    What a size-only token count is measured on: the method's own assembly (``order``) of these counts.
    """
    rank = ctx.valid.long().cumsum(1)  # (n, N) 1-based rank among the unpadded tokens
    crop_keep = ctx.valid & (rank <= k.to(rank.device)[:, None])  # (n, N)
    return Selection(torch.arange(k0), crop_keep, torch.zeros(ctx.valid.shape[0], dtype=torch.float64))
