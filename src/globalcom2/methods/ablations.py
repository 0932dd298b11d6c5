"""The paper's ablations (Tables I, IV, V) and a random floor, as named methods.

Table IV / V variants are GlobalCom² with one design choice pinned (``allocation`` or
``importance``); they take every other GlobalCom² option. Table I variants change which views
reach the language model, as in the paper's input study: by default (R = 1) a view is either kept
whole or dropped; with R < 1 every kept view keeps its top ``int(N_v R)`` tokens by [CLS] score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import core
from .base import ImageContext, MethodConfig, Requirements, Selection, VisionMethod
from .checks import check_choice, check_scorer
from .globalcom2 import BUDGETS, SCORES, GlobalCom2Config


@dataclass(frozen=True)
class _PinnedGlobalCom2(GlobalCom2Config):
    """GlobalCom² with some options pinned by the variant's name."""

    pinned: ClassVar[dict[str, Any]] = {}

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """GlobalCom²'s options minus the pinned ones."""
        return tuple(n for n in super().option_names() if n not in cls.pinned)

    def __post_init__(self) -> None:
        for key, value in self.pinned.items():
            object.__setattr__(self, key, value)
        super().__post_init__()


def _pinned(name: str, description: str, paper: str, **pinned: Any) -> type[GlobalCom2Config]:
    cls = type(
        "".join(p.title() for p in name.split("_")) + "Config",
        (_PinnedGlobalCom2,),
        {"name": name, "description": description, "paper": paper, "pinned": pinned, "__module__": __name__},
    )
    return dataclass(frozen=True)(cls)


T4 = "GlobalCom² paper, Table IV (crop ratio allocation)"
T5 = "GlobalCom² paper, Table V (crop token importance)"
TABLE_IV_V = (
    _pinned("uniform", "GlobalCom² with every crop at ratio R (Table IV)", T4, allocation="uniform"),
    _pinned(
        "ntopk",
        "GlobalCom² with crop ratios from the share of the thumbnail's top-k tokens over each crop (Table IV)",
        T4,
        allocation="ntopk",
    ),
    _pinned(
        "softmax_max",
        "GlobalCom² with crop ratios from a softmax over each crop's max score (Table IV)",
        T4,
        allocation="softmax_max",
    ),
    _pinned(
        "softmax_sum",
        "GlobalCom² with crop ratios from a softmax over each crop's summed score (= default)",
        T4,
        allocation="softmax_sum",
    ),
    _pinned(
        "local_only",
        "GlobalCom² keeping crop tokens by the crop's own [CLS] attention only (Table V)",
        T5,
        importance="local_only",
    ),
    _pinned(
        "global_only",
        "GlobalCom² keeping crop tokens by the resized thumbnail attention only (Table V)",
        T5,
        importance="global_only",
    ),
    _pinned(
        "global_local",
        "GlobalCom² keeping crop tokens by global + local importance (= default, Table V)",
        T5,
        importance="global_local",
    ),
)


@dataclass(frozen=True)
class RandomConfig(GlobalCom2Config):
    """GlobalCom²'s per-view budgets, random tokens (a floor). ``seed`` fixes the draw."""

    name = "random"
    description = "random tokens with GlobalCom²'s per-view budgets (seeded floor)"
    paper = "baseline floor"

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    def select(self, ctx: ImageContext) -> Selection:
        """Budgets from the thumbnail as GlobalCom² allocates them, tokens drawn at random."""
        # the same draw for an image whether it is alone or in a batch
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(ctx.scores.shape, generator=gen).to(ctx.scores.device)
        ratios = self.crop_ratios(ctx)
        k0, k = self.budgets(ctx, ratios)
        crop_keep = core.keep_top_per_row([row[m] for row, m in zip(noise[1:], ctx.valid)], ctx.valid, k)
        return Selection(core.top_indices(noise[0], k0), crop_keep, ratios)


VIEW_MODES = ("thumbnail_only", "crops_only", "drop_random_crop", "drop_important_crop", "drop_unimportant_crop")


@dataclass(frozen=True)
class _ViewSubsetConfig(VisionMethod):
    """Table I input study: which views reach the LLM. Stock layout, views kept in full at R = 1.

    retention_ratio: share of each kept view's tokens (top ``int(N_v R)`` by [CLS] score); 1.0 = the paper.
    score: [CLS] attention of the last layer as "logits" (default) or "softmax".
    scorer: how tokens and crops are rated: "auto" ("cls" where the tower has a [CLS] token, else
        "global_dissimilarity"), "cls", "attention_received" or "global_dissimilarity".
    seed: which crop ``drop_random_crop`` drops (same for every image, batch or not).
    budget: "authors" (default) keeps ``int(N_j R)`` of every crop left. Which crop
        ``drop_important_crop`` / ``drop_unimportant_crop`` drop depends on the image's content, and so
        does their count; with "exact" the crops left keep round(R (sum N_j - max N_j)) tokens together,
        shared in proportion to N_j (capped at N_j), a count that depends on the image size only. The
        other variants' counts already depend on the size only: "exact" changes nothing there.
    """

    mode: ClassVar[str] = ""
    paper = "GlobalCom² paper, Table I"

    retention_ratio: float = 1.0
    score: str = "logits"
    seed: int = 0
    budget: str = "authors"
    scorer: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scorer(self.scorer)
        check_choice("score", self.score, SCORES)
        check_choice("budget", self.budget, BUDGETS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")

    @property
    def requires(self) -> Requirements:
        """The last layer's [CLS] row (``score``), stock layout (unpadded rows with newlines, transformers'
        rounding), thumbnail in raster order."""
        return Requirements(
            score=self.score, scorer=self.scorer, layout="spatial",
            thumbnail_order="spatial",
        )  # fmt: skip

    def dropped_crop(self, ctx: ImageContext) -> int | None:
        """Index of the crop this variant removes, if any (importance = summed thumbnail score)."""
        n = ctx.grid[0] * ctx.grid[1]
        if self.mode == "drop_random_crop":
            return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(self.seed)))
        if self.mode in ("drop_important_crop", "drop_unimportant_crop"):
            importance = core.crop_region_stats(ctx.thumbnail, ctx.side, ctx.grid, "sum", weights=ctx.region_weights)
            return int(importance.argmax() if self.mode == "drop_important_crop" else importance.argmin())
        return None

    def content_dependence(self) -> str | None:
        """Why the count depends on the pixels: the dropped crop is chosen by the thumbnail's attention."""
        if self.budget == "exact" or self.mode not in ("drop_important_crop", "drop_unimportant_crop"):
            return None
        return (
            f"method {self.name!r} drops a crop chosen by the thumbnail's attention, so with budget='authors' "
            "its token count depends on the image's content; pass budget='exact' for a count that depends on "
            "the image size only"
        )

    def budgets(self, ctx: ImageContext, drop: int | None) -> tuple[int, torch.Tensor]:
        """(thumbnail tokens, (n,) long crop tokens) when crop ``drop`` (or none) is removed."""
        r = self.retention_ratio
        n_tok = ctx.valid.sum(1).cpu()  # (n,) N_j
        k0 = 0 if self.mode == "crops_only" else int(core.count_kept(ctx.thumbnail.numel(), r))
        if self.mode == "thumbnail_only":
            return k0, torch.zeros_like(n_tok)
        caps = n_tok.clone()
        if drop is not None:
            caps[drop] = 0
        if self.budget == "exact" and self.mode != "drop_random_crop" and drop is not None:
            total = core.exact_total(n_tok.sum() - n_tok.max(), r)
            return k0, core.allocate_exact(caps.double(), caps, total)
        return k0, core.count_kept(caps, r)

    def size_budget(self, ctx: ImageContext) -> tuple[int, torch.Tensor]:
        """(thumbnail tokens, (n,) crop tokens) of one split every image of this geometry shares in count
        (the geometry only, never the scores)."""
        if self.mode == "drop_random_crop":
            return self.budgets(ctx, self.dropped_crop(ctx))
        return self.budgets(ctx, 0 if self.mode in ("drop_important_crop", "drop_unimportant_crop") else None)

    def select(self, ctx: ImageContext) -> Selection:
        """Keep whole views (or their top tokens) except the ones the variant removes."""
        n = ctx.valid.shape[0]
        ratios = torch.full((n,), 0.0 if self.mode == "thumbnail_only" else self.retention_ratio, dtype=torch.float64)
        drop = self.dropped_crop(ctx)
        if drop is not None:
            ratios[drop] = 0.0
        k0, k = self.budgets(ctx, drop)
        crop_keep = core.keep_top_per_row([row[m] for row, m in zip(ctx.crops, ctx.valid)], ctx.valid, k)
        return Selection(core.top_indices(ctx.thumbnail, k0), crop_keep, ratios)

    def order(self, sel: Selection, ctx: ImageContext) -> torch.Tensor:
        """Stock layout; the thumbnail alone has no crop rows, hence no newlines."""
        if self.mode == "thumbnail_only":
            return sel.thumb_keep.sort().values
        return super().order(sel, ctx)


def _view_variant(mode: str, description: str) -> type[MethodConfig]:
    cls = type(
        "".join(p.title() for p in mode.split("_")) + "Config",
        (_ViewSubsetConfig,),
        {"name": mode, "mode": mode, "description": description, "__module__": __name__},
    )
    return dataclass(frozen=True)(cls)


TABLE_I = (
    _view_variant("thumbnail_only", "only the thumbnail reaches the LLM (Table I a)"),
    _view_variant("crops_only", "only the crops (with their newlines) reach the LLM (Table I a)"),
    _view_variant("drop_random_crop", "drop one crop chosen at random (seeded) (Table I b)"),
    _view_variant("drop_important_crop", "drop the crop with the most thumbnail [CLS] attention (Table I b)"),
    _view_variant("drop_unimportant_crop", "drop the crop with the least thumbnail [CLS] attention (Table I b)"),
)
