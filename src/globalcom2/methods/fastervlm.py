"""FasterVLM: every view keeps its own top tokens by [CLS] attention, no global guidance.

Follows how FasterVLM's authors (github Theia-4869/FasterVLM, ``llava_arch.py`` and the CLIP
encoder) run LLaVA-NeXT: the [CLS] attention *probabilities* of the layer whose output becomes
the visual features (``vision_feature_layer``, -2), averaged over heads; each view (thumbnail
and every crop) keeps the same number ``round(N R)`` of tokens; kept tokens are emitted in
raster order, the thumbnail's first and the crops' read row by row across the whole crop grid.
Their LLaVA-NeXT path forces the ``spatial`` merge, so crops are *not* unpadded and no newline
tokens are added; ``unpad=True`` instead applies R to each crop's unpadded tokens and keeps
stock LLaVA-NeXT's newlines, as the GlobalCom² paper describes its FasterVLM runs.

The selection is identical to the released code's; the crop grid is not always. FasterVLM's own
``select_best_resolution`` (``llava/mm_utils.py``) picks the pinpoint whose canvas the resized
image fills the most, the stock processor the one with the largest effective resolution, then the
least waste. With LLaVA-NeXT-7B's pinpoints a 640x427 or 1920x1080 px image gets a 2x2 crop grid
from the stock processor and 1x2 (one row of two crops) from FasterVLM; 300x220 px gets 1x2 vs
2x2 (484 of 1521 sizes on a 50-px lattice from 100 to 2000 px differ). The library reads the grid
from the stock processor's pixel values, so it follows the stock grid: unavoidable on a stock
processor, and the kept count ``(1 + n) round(N R)`` follows its number of crops n. See
``docs/fidelity.md``.

One departure from their code, the stock cap: without unpadding every view keeps round(N R) tokens of
the padded grid, letterbox padding included, which for R < 1 can be more than stock LLaVA-NeXT feeds its
LLM (at a high R on images with much padding; a 3x1000 px image already at R = 0.5: 1152 tokens where
stock sends 576). The views' counts are then lowered to one common ceiling so that the total is at most
stock's (``core.hold_views``); where the released count fits (every image at the usual R <= 0.75 but
very thin ones) it is kept exactly. R = 1 keeps every token of every view, as theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import core
from .base import ImageContext, Requirements, Selection, ViewSelector, VisionMethod, stock_length
from .checks import check_choice, check_scorer


@dataclass(frozen=True)
class FasterVLMConfig(VisionMethod):
    """FasterVLM options.

    retention_ratio: R in (0, 1]; every view keeps ``max(1, round(N R))`` tokens.
    unpad: False (FasterVLM's code: padded crop grid, no newlines; for R < 1 held to the stock count, see
        the module docstring) or True (R of each crop's unpadded tokens, ``int(N_j R)``, stock
        newlines: never above stock).
    score: "softmax" (FasterVLM) or "logits".
    scorer: "auto" ("cls" where the tower has a [CLS] token, else "global_dissimilarity"), "cls",
        "attention_received" or "global_dissimilarity" (``globalcom2.models.scoring``).
    budget: "authors" or "exact"; accepted for symmetry with GlobalCom², changes nothing: every view's
        count already depends on the image size only (``globalcom2.num_image_tokens``).
    """

    name = "fastervlm"
    description = "FasterVLM: each view keeps its top-R tokens by [CLS] attention (no global guidance)"
    paper = "FasterVLM [21] (Zhang et al., 2024)"

    unpad: bool = False
    score: str = "softmax"
    budget: str = "authors"
    scorer: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scorer(self.scorer)
        if not isinstance(self.unpad, bool):
            raise TypeError(f"unpad must be True or False, got {self.unpad!r}")
        check_choice("score", self.score, ("softmax", "logits"))
        check_choice("budget", self.budget, ("authors", "exact"))

    @property
    def requires(self) -> Requirements:
        """The [CLS] row of the feature layer (``vision_feature_layer``), like FasterVLM; unpadded crops with
        stock newlines when ``unpad``, FasterVLM's flat stitched grid otherwise; thumbnail in raster order."""
        return Requirements(
            score_layer=None, score=self.score, scorer=self.scorer, unpad=self.unpad,
            layout="spatial" if self.unpad else "flat",
            thumbnail_order="spatial",
        )  # fmt: skip

    def view_budget(self, n_tokens: torch.Tensor) -> torch.Tensor:
        """Tokens kept of views with ``n_tokens`` candidates each."""
        r = self.retention_ratio
        if self.unpad:
            return core.count_kept(n_tokens, r)
        return torch.clamp(torch.round(n_tokens.double() * r), min=1).long().clamp(max=n_tokens)

    def size_budget(self, ctx: ImageContext) -> tuple[int, torch.Tensor]:
        """(thumbnail tokens, (n,) crop tokens): the counts ``select`` keeps for any image of this geometry; without
        unpadding and R < 1 held to the stock count (``core.hold_views``; see the module docstring)."""
        n_thumb = torch.tensor(ctx.thumbnail.numel())
        k0, k = int(self.view_budget(n_thumb)), self.view_budget(ctx.valid.sum(1).cpu())
        if self.unpad or self.retention_ratio >= 1:
            return k0, k
        held = core.hold_views(torch.cat([torch.tensor([k0]), k]), stock_length(ctx))
        return int(held[0]), held[1:]

    def select(self, ctx: ImageContext) -> Selection:
        """Top tokens of every view by its own [CLS] attention."""
        k0, k = self.size_budget(ctx)
        thumb_keep = core.top_indices(ctx.thumbnail, k0)
        scores = [row[m] for row, m in zip(ctx.crops, ctx.valid)]
        crop_keep = core.keep_top_per_row(scores, ctx.valid, k)
        ratios = torch.full((ctx.valid.shape[0],), self.retention_ratio, dtype=torch.float64)
        return Selection(thumb_keep, crop_keep, ratios)


class FasterVLMSelector(ViewSelector):
    """FasterVLM inside one view: its own top k by [CLS] attention."""

    name = "fastervlm"
    method = FasterVLMConfig

    def pick(self, ctx: ImageContext, state: dict, view: int, pos: torch.Tensor, k: int, options: dict):
        """Top k by the view's scores (thumbnail: best first)."""
        if view == 0:
            return core.top_indices(ctx.thumbnail, k), None
        return pos[torch.topk(ctx.scores[view, pos], k).indices], None
