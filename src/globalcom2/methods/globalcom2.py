"""GlobalCom²: the thumbnail commands the compression of every crop (paper Sec. III-B)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import core
from .base import ImageContext, MethodConfig, Selection, check_choice, check_number

ALLOCATIONS = ("softmax_sum", "softmax_max", "ntopk", "uniform")
IMPORTANCES = ("global_local", "local_only", "global_only")
SCORES = ("logits", "softmax")
THUMBNAIL_ORDERS = ("score", "spatial")
LAYOUTS = ("authors", "spatial")


@dataclass(frozen=True)
class GlobalCom2Config(MethodConfig):
    """GlobalCom² options. The defaults reproduce the authors' released code token for token.

    retention_ratio: R in (0, 1]; the thumbnail keeps int(N R) tokens, crop j keeps int(N_j r_j).
    alpha: weight of global (thumbnail) vs local (crop) importance of crop tokens, Eq. 7. The
        authors add the two L2-normalised scores, which ranks exactly like alpha = 0.5.
    temperature: tau of the crop-ratio softmax, Eq. 3.
    score: "logits" = head-averaged pre-softmax [CLS] attention (authors' code);
        "softmax" = head-averaged attention probabilities (paper Eq. 1).
    thumbnail_order: "score" emits kept thumbnail tokens best first (authors' code);
        "spatial" emits them in raster order.
    layout: "authors" writes kept crop tokens the way the authors' ``compress_crops`` does
        (slot i of a crop takes its i-th kept token, newline after every row of the padded grid);
        "spatial" keeps true positions with one newline per unpadded row, like stock LLaVA-NeXT.
        Because of those padded-grid newlines, "authors" can hand the LLM more tokens than stock
        for very thin images (e.g. 4000x1 px at R = 0.9); "spatial" never exceeds stock.
    allocation: how crop ratios are allocated (Table IV): "softmax_sum" (default), "softmax_max",
        "ntopk", "uniform".
    importance: crop-token importance (Table V): "global_local" (default), "local_only", "global_only".
    """

    name = "globalcom2"
    description = "GlobalCom²: thumbnail-guided crop ratios and global+local crop-token importance"
    paper = "GlobalCom² (this paper), Sec. III-B"

    alpha: float = 0.5
    temperature: float = 10.0
    score: str = "logits"
    thumbnail_order: str = "score"
    layout: str = "authors"
    allocation: str = "softmax_sum"
    importance: str = "global_local"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("alpha", self.alpha, 0.0, 1.0, low_open=False)
        check_number("temperature", self.temperature, 0.0, float("inf"), high_open=True)
        check_choice("score", self.score, SCORES)
        check_choice("thumbnail_order", self.thumbnail_order, THUMBNAIL_ORDERS)
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("allocation", self.allocation, ALLOCATIONS)
        check_choice("importance", self.importance, IMPORTANCES)

    # -- the two stages ------------------------------------------------------------------------

    def crop_ratios(self, ctx: ImageContext) -> torch.Tensor:
        """(n,) float64 retention ratio of every crop, from the thumbnail scores."""
        r, thumb, n = self.retention_ratio, ctx.thumbnail, ctx.grid[0] * ctx.grid[1]
        if self.allocation == "uniform":
            return torch.full((n,), r, dtype=torch.float64, device=thumb.device)
        if self.allocation == "ntopk":
            # share of the thumbnail's top-k (k = R N) tokens that fall over each crop, scaled so
            # the crops keep R of their tokens on average
            region = core.crop_regions(ctx.side, ctx.grid, thumb.device)
            top = core.top_indices(thumb, int(core.count_kept(thumb.numel(), r)))
            share = torch.bincount(region[top], minlength=n).double() / max(top.numel(), 1)
            return (r * n * share).clamp(max=1.0)
        reduce = "max" if self.allocation == "softmax_max" else "sum"
        stats = core.crop_region_stats(thumb, ctx.side, ctx.grid, reduce)
        return core.softmax_retention(stats, r, self.temperature)

    def crop_importance(self, ctx: ImageContext) -> list[torch.Tensor]:
        """Per crop, (N_j,) importance of its unpadded tokens (Eq. 7 on L2-normalised scores)."""
        local = core.normalized_masked(ctx.crops, ctx.valid)
        if self.importance == "local_only":
            return local
        glob = core.global_crop_scores(ctx.thumbnail, ctx.valid, ctx.grid, ctx.side)
        glob = core.normalized_masked(glob, ctx.valid)
        if self.importance == "global_only":
            return glob
        a = self.alpha
        return [a * g + (1 - a) * loc for g, loc in zip(glob, local)]

    def select(self, ctx: ImageContext) -> Selection:
        """Keep the top int(N R) thumbnail tokens and the top int(N_j r_j) tokens of each crop."""
        thumb = ctx.thumbnail
        k0 = int(core.count_kept(thumb.numel(), self.retention_ratio))
        thumb_keep = core.top_indices(thumb, k0)
        ratios = self.crop_ratios(ctx)
        k = core.count_kept(ctx.valid.sum(1).cpu(), ratios.cpu())
        crop_keep = core.keep_top_per_row(self.crop_importance(ctx), ctx.valid, k)
        return Selection(thumb_keep, crop_keep, ratios)
