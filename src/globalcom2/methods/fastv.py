"""FastV: after layer K of the language model, keep only the image tokens the last token attends to most.

Follows FastV's authors (github pkunlp-icler/FastV): layers ``0 .. K-1`` see every token; the
attention probabilities of layer ``K-1`` from the last prompt token, averaged over heads, rank
the image tokens; layers ``K ..`` see the text plus the top ``int(n_image R)`` image tokens, in
their original order and at their original rotary positions. Like the KV-cache versions in
their repository (their HF port and lmms-eval script), pruning happens once at prefill: layers
``>= K`` cache only the kept tokens and decoding steps attend to those. The vision side and the
visual tokens entering the LLM are stock LLaVA-NeXT's (thumbnail, unpadded crops, newlines);
all of them form the candidate "image tokens", as when FastV is run on an AnyRes sequence.

Differences from the released code (details in ``docs/fidelity.md``):

* The paper's runs used ``generate(..., use_cache=False)``: every decoding step re-runs the whole
  sequence and re-selects the image tokens by the newest token's attention. Like the KV-cache
  versions, the library selects once at prefill (same first token; later tokens may differ).
* The count is ``int(n_image R)`` (floor, float64), as in FastV's lmms-eval script
  (``int(576 * ratio)``) and as every other method here counts a budget, so the budget is never
  exceeded. The llava-hf port takes the pruned share r and keeps ``round(n (1 - r))``: one token
  more when the fractional part of ``n R`` is above one half (n = 2883, R = 0.25: 720 here, 721
  there) and half-to-even at exactly one half (n = 579, R = 0.5: 289 vs 290). Whenever ``n R`` is
  an integer (2880 tokens at R = 0.25, 0.5, 0.75) they agree.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

from .. import core
from .base import LLMMethod, PruneContext, Stage, check_pruning_layer

#: FastV's released setting: prune after layer K = 2
PRUNED_LAYER = 2


@dataclass(frozen=True)
class FastVConfig(LLMMethod):
    """FastV options.

    retention_ratio: R in (0, 1]; each sample keeps ``int(n_image R)`` of its image tokens.
    k: prune before decoder layer K (0-based) by layer K-1's attention; 1 <= K < num layers.
    """

    name = "fastv"
    description = "FastV: after LLM layer K, keep the image tokens the last token attends to most"
    paper = "FastV [20] (Chen et al., ECCV 2024)"

    k: int = PRUNED_LAYER

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.k, (bool, np.bool_)) or not isinstance(self.k, numbers.Integral) or self.k < 1:
            raise ValueError(
                f"k must be an int >= 1 (prune before layer K using layer K-1's attention), got {self.k!r}"
            )
        object.__setattr__(self, "k", int(self.k))

    def check_model(self, model) -> None:
        """K must name a layer of this model's language model."""
        check_pruning_layer(self.k, model)

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        """The decoder layer whose input is shortened."""
        return (self.k,)

    def stage_tokens(self, n_visual: int, num_layers: int) -> tuple[int, ...]:
        """Visual tokens from layer K on, for a row with ``n_visual`` of them: (int(n_visual R),)."""
        return (int(core.count_kept(torch.tensor([n_visual]), self.retention_ratio)[0]),)

    def keep_count(self, n_image: torch.Tensor) -> torch.Tensor:
        """Image tokens kept per sample: int(n_image R)."""
        return core.count_kept(n_image.cpu(), self.retention_ratio)

    def prune(self, ctx: PruneContext) -> Stage:
        """Rank image tokens by the last token's head-averaged attention in layer K-1."""
        b, length = ctx.key_mask.shape
        idx = torch.arange(length, device=ctx.key_mask.device)
        last = torch.where(ctx.key_mask, idx, -1).amax(1)  # last real token of each row
        score = ctx.probs(last[:, None]).mean(1)[:, 0]  # (B, L)
        n_vis = (ctx.visual & ctx.key_mask).sum(1)
        k = self.keep_count(n_vis).tolist()
        hidden, positions, visual, sources = [], [], [], []
        for row in range(b):
            vis = torch.nonzero(ctx.visual[row] & ctx.key_mask[row]).squeeze(1)
            text = torch.nonzero(~ctx.visual[row] & ctx.key_mask[row]).squeeze(1)
            top = vis[torch.topk(score[row, vis], k[row]).indices]
            keep = torch.cat([text, top]).sort().values
            hidden.append(ctx.hidden[row, keep])
            positions.append(ctx.positions[row, keep])
            visual.append(ctx.visual[row, keep])
            sources.append(keep)
        return Stage(hidden, positions, visual, sources)
