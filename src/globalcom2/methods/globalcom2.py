"""GlobalCom²: the thumbnail commands the compression of every crop (paper Sec. III-B)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import core
from .base import (
    TRANSFORMERS_UNPAD_DIGITS,
    ImageContext,
    Requirements,
    Selection,
    ViewSelector,
    VisionMethod,
    stock_length,
)
from .checks import check_choice, check_number, check_scorer

ALLOCATIONS = ("softmax_sum", "softmax_max", "ntopk", "uniform")
IMPORTANCES = ("global_local", "local_only", "global_only")
SCORES = ("logits", "softmax")
THUMBNAIL_ORDERS = ("score", "spatial")
LAYOUTS = ("authors", "spatial")
BUDGETS = ("authors", "exact")


@dataclass(frozen=True)
class GlobalCom2Config(VisionMethod):
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
        Because of those padded-grid newlines, "authors" would hand the LLM more tokens than stock
        at a high R on images with much letterbox padding (e.g. 3x1000 px at R = 0.95; the authors'
        code does); for R < 1 the crop budgets, then the thumbnail's, are lowered there so that the
        total stays at most stock's (``hold_to_stock``; a departure, docs/fidelity.md). "spatial"
        never exceeds stock.
    allocation: how crop ratios are allocated (Table IV): "softmax_sum" (default), "softmax_max",
        "ntopk", "uniform".
    importance: crop-token importance (Table V): "global_local" (default), "local_only", "global_only".
    scorer: how every view's tokens are rated: "auto" (default: "cls" where the vision tower has a [CLS]
        token, as the paper; "global_dissimilarity" on towers without one, e.g. SigLIP), "cls",
        "attention_received" or "global_dissimilarity" (see ``globalcom2.models.scoring``).
    budget: "authors" (default): crop j keeps int(N_j r_j), so the total depends on the image's content
        (except with allocation="uniform"). "exact": the crops together keep round(R sum N_j), shared in
        proportion to N_j r_j with crop j capped at N_j (``core.allocate_exact``), so the number of visual
        tokens is a function of the image size alone (``globalcom2.num_image_tokens``); which tokens a crop
        keeps is chosen as before. With layout="authors" the crop budget, then the thumbnail's, shrinks
        where needed so that an image never gets more tokens than stock LLaVA-NeXT gives it (with
        budget="authors" as well: ``hold_to_stock``).
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
    budget: str = "authors"
    scorer: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scorer(self.scorer)
        check_number("alpha", self.alpha, 0.0, 1.0, low_open=False)
        check_number("temperature", self.temperature, 0.0, float("inf"), high_open=True)
        check_choice("score", self.score, SCORES)
        check_choice("thumbnail_order", self.thumbnail_order, THUMBNAIL_ORDERS)
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("allocation", self.allocation, ALLOCATIONS)
        check_choice("importance", self.importance, IMPORTANCES)
        check_choice("budget", self.budget, BUDGETS)

    @property
    def requires(self) -> Requirements:
        """Last layer's [CLS] row (``score``), unpadded crops (the authors truncate; ``layout="spatial"`` rounds
        like transformers), this config's layout and thumbnail order."""
        rounding = None if self.layout == "authors" else TRANSFORMERS_UNPAD_DIGITS
        return Requirements(
            score_layer=-1, score=self.score, scorer=self.scorer, unpad=True, unpad_rounding=rounding,
            layout=self.layout, thumbnail_order=self.thumbnail_order,
        )  # fmt: skip

    # -- the two stages ------------------------------------------------------------------------

    def crop_ratios(self, ctx: ImageContext) -> torch.Tensor:
        """(n,) float64 retention ratio of every crop, from the thumbnail scores."""
        r, thumb, n = self.retention_ratio, ctx.thumbnail, ctx.grid[0] * ctx.grid[1]
        if self.allocation == "uniform":
            return torch.full((n,), r, dtype=torch.float64, device=thumb.device)
        if self.allocation == "ntopk":
            # share of the thumbnail's top-k (k = R N) tokens that fall over each crop, scaled so
            # the crops keep R of their tokens on average
            top = core.top_indices(thumb, int(core.count_kept(thumb.numel(), r)))
            if ctx.region_weights is not None:  # area of each top token over each crop
                share = ctx.region_weights.to(thumb.device, torch.float64)[:, top].sum(1) / max(top.numel(), 1)
            else:
                region = core.crop_regions(ctx.side, ctx.grid, thumb.device)
                share = torch.bincount(region[top], minlength=n).double() / max(top.numel(), 1)
            return (r * n * share).clamp(max=1.0)
        reduce = "max" if self.allocation == "softmax_max" else "sum"
        stats = core.crop_region_stats(thumb, ctx.side, ctx.grid, reduce, weights=ctx.region_weights)
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

    # -- budgets -------------------------------------------------------------------------------

    def content_dependence(self) -> str | None:
        """Why the count depends on the pixels: crop j keeps int(N_j r_j) with content-driven r_j."""
        if self.budget == "exact" or self.allocation == "uniform":
            return None
        return (
            f"with budget='authors' and allocation={self.allocation!r}, method {self.name!r} keeps "
            "int(N_j r_j) tokens of crop j, which depends on the image's content; pass budget='exact' "
            "for a count that depends on the image size only"
        )

    def _layout_newlines(self, ctx: ImageContext) -> int:
        """Newline tokens this config's layout emits for ``ctx``'s geometry whatever is kept."""
        no_ratios = torch.zeros(ctx.valid.shape[0], dtype=torch.float64)
        empty = Selection(ctx.thumbnail.new_zeros(0, dtype=torch.long), torch.zeros_like(ctx.valid), no_ratios)
        return int(self.order(empty, ctx).numel())

    def exact_budget(self, ctx: ImageContext) -> tuple[int, int]:
        """(thumbnail tokens, crop tokens in total) under ``budget="exact"``: int(N R) and round(R sum N_j).

        With layout="authors" (a newline after every padded-grid row) the total is held to the stock
        count of this geometry, N + H (W + 1) for the H x W unpadded box: the crops give up tokens
        first, then the thumbnail.
        """
        n_tok = ctx.valid.sum(1)  # (n,) N_j
        k0 = int(core.count_kept(ctx.thumbnail.numel(), self.retention_ratio))
        crops = core.exact_total(n_tok, self.retention_ratio)
        if self.layout == "authors":
            grid_valid = core.crops_to_grid(ctx.valid, ctx.grid, ctx.side)  # (nph*S, npw*S)
            h, w = int(grid_valid.any(1).sum()), int(grid_valid.any(0).sum())
            newlines = self._layout_newlines(ctx)
            excess = k0 + crops + newlines - (ctx.thumbnail.numel() + h * (w + 1))
            cut = min(max(excess, 0), crops)
            crops, k0 = crops - cut, max(k0 - max(excess - cut, 0), 0)
        return k0, crops

    def hold_to_stock(self, ctx: ImageContext, k0: int, k: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(k0, k) under ``budget="authors"`` lowered where the emitted total (kept tokens plus layout="authors"'s
        padded-grid newlines) would exceed the stock count of this geometry (``stock_length``): the crops give up
        tokens first, in proportion to their counts, then the thumbnail. Unchanged where the total fits (every
        image at the usual R <= 0.75 but very thin ones), at R = 1 (the authors' layout of every token) and with
        layout="spatial", which never exceeds stock."""
        if self.layout != "authors" or self.retention_ratio >= 1:
            return k0, k
        kept = int(k.sum())
        excess = k0 + kept + self._layout_newlines(ctx) - stock_length(ctx)
        if excess <= 0:
            return k0, k
        cut = min(excess, kept)
        return max(k0 - (excess - cut), 0), core.allocate_exact(k.double(), k, kept - cut)

    def size_budget(self, ctx: ImageContext) -> tuple[int, torch.Tensor]:
        """(thumbnail tokens, (n,) crop tokens) of one split every image of this geometry shares in count.

        Reads only the geometry (``ctx.valid``, ``ctx.side``, ``ctx.grid``), never the scores.
        """
        n_tok = ctx.valid.sum(1).cpu()  # (n,)
        if self.budget == "exact":
            k0, total = self.exact_budget(ctx)
            return k0, core.allocate_exact(n_tok.double(), n_tok, total)
        k0 = int(core.count_kept(ctx.thumbnail.numel(), self.retention_ratio))
        return self.hold_to_stock(ctx, k0, core.count_kept(n_tok, self.retention_ratio))

    def budgets(self, ctx: ImageContext, ratios: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(thumbnail tokens, (n,) long crop tokens) for crop ratios ``ratios``, under this config's budget rule."""
        n_tok = ctx.valid.sum(1).cpu()  # (n,) N_j
        if self.budget == "exact":
            k0, total = self.exact_budget(ctx)
            return k0, core.allocate_exact(n_tok.double() * ratios.cpu(), n_tok, total)
        k0 = int(core.count_kept(ctx.thumbnail.numel(), self.retention_ratio))
        return self.hold_to_stock(ctx, k0, core.count_kept(n_tok, ratios.cpu()))

    def select(self, ctx: ImageContext) -> Selection:
        """Keep the top int(N R) thumbnail tokens and the top k_j tokens of each crop (k_j: see ``budgets``)."""
        ratios = self.crop_ratios(ctx)
        k0, k = self.budgets(ctx, ratios)
        thumb_keep = core.top_indices(ctx.thumbnail, k0)
        crop_keep = core.keep_top_per_row(self.crop_importance(ctx), ctx.valid, k)
        return Selection(thumb_keep, crop_keep, ratios)


class GlobalCom2Selector(ViewSelector):
    """GlobalCom²'s crop-token importance (global + local, ``alpha``/``importance``); thumbnail by [CLS]."""

    name = "globalcom2"
    method = GlobalCom2Config
    options = ("alpha", "importance")

    def prepare(self, ctx: ImageContext, options: dict) -> dict:
        """Per crop, (N_j,) importance of its unpadded tokens."""
        cfg = GlobalCom2Config(alpha=options["alpha"], importance=options["importance"])
        return {"importance": cfg.crop_importance(ctx)}

    def pick(self, ctx: ImageContext, state: dict, view: int, pos: torch.Tensor, k: int, options: dict):
        """Thumbnail: top k by [CLS] score (best first); crop j: top k by importance."""
        if view == 0:
            return core.top_indices(ctx.thumbnail, k), None
        return pos[torch.topk(state["importance"][view - 1], k).indices], None
