"""Composition: GlobalCom²'s thumbnail-guided crop budgets with any per-crop token selector.

GlobalCom²'s claim is that the thumbnail should decide how much each crop keeps; the newer methods
(FasterVLM, CDPruner, DivPrune, DART, VisionZip) each pick tokens *inside* a set. ``composed`` runs
them together, ``allocation`` x ``selector``, so one can test whether global guidance helps a
newer selector:

* ``allocation`` sets the counts: ``"globalcom2"`` gives crop j the ratio r_j of GlobalCom²'s
  default rule (a softmax over the thumbnail [CLS] attention falling on each crop, ``temperature``);
  ``"uniform"`` gives every crop R. Crop j keeps ``int(N_j r_j)`` of its N_j unpadded tokens
  (``budget="exact"``: ``round(R sum N_j)`` shared in proportion to N_j r_j, as GlobalCom²'s exact
  budget), the thumbnail ``int(N R)``: exactly GlobalCom²'s counts at the same R and options.
* ``selector`` picks which tokens fill each count, inside each crop's unpadded tokens:

  - ``"globalcom2"``: global + local [CLS] importance (``alpha``, ``importance``); with the default
    allocation this *is* ``method="globalcom2"``, token for token;
  - ``"fastervlm"``: the crop's own [CLS] attention, top-k;
  - ``"cdpruner"``: greedy MAP of CDPruner's conditional DPP over the crop's projected features
    (relevance to the prompt's text embeddings, min-max normalised over the image's views as in
    ``cdpruner``; ``text_pooling``, ``negate``);
  - ``"divprune"``: DivPrune's greedy max-min cosine diversity of the crop's projected features;
  - ``"dart"``: DART's pivots (``pivot_image_tokens`` largest-L1 tokens of the crop, kept, and
    ``pivot_text_tokens`` prompt text embeddings); the crop's other ``k - P_img`` kept tokens are
    split over the pivots as evenly as possible (the first ``(k - P_img) mod P`` pivots take one
    more), each taking its share of the free tokens least cosine-similar to it, in turn. The
    standalone ``dart`` gives every pivot ``floor(...)`` and so misses its target by up to P - 1;
    here the crop's count is met exactly;
  - ``"visionzip"``: ``C = round(k contextual_share)`` contextual tokens (VisionZip's key-similarity
    merge of the crop's other unpadded tokens onto evenly spaced targets, projected by the model's
    projector) and ``k - C`` dominant patches by [CLS] attention; no [CLS] token is emitted (the
    composition keeps patches and merged patches only).

* ``thumbnail``: ``"selector"`` (default) lets the selector pick the thumbnail's ``int(N R)``
  tokens too, over all N (so the composition changes only the allocation between the crops);
  ``"globalcom2"`` keeps GlobalCom²'s rule, its top ``int(N R)`` by [CLS] attention.

One [CLS] attention map serves the allocation and the [CLS]-ranked selectors: GlobalCom²'s (the last
vision layer, ``score="logits"`` by default, ``"softmax"`` for probabilities). The standalone
``fastervlm`` and ``visionzip`` rank by the feature layer's probabilities instead; inside the
composition they rank by the map that allocates the budgets, so the counts stay GlobalCom²'s.
VisionZip's merge metric is the keys of that same layer.

Emission: kept thumbnail tokens (``thumbnail_order="score"``: in the selector's order, best or first
picked first, CDPruner/DART in raster order; ``"spatial"``: raster), then the crops as GlobalCom²
lays them out (``layout``), then (visionzip only) the contextual tokens of the thumbnail and of every
crop, in view order, after the crop grid. The selector's own options are refused for another selector
(``alpha`` with ``selector="divprune"`` is a ValueError naming both), as are options of no selector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import core
from .base import ImageContext, Requirements, Selection, ViewSelector, VisionMethod
from .cdpruner import CDPrunerSelector
from .checks import check_choice
from .dart import DARTSelector, dart_keep_exact, pivot_quota  # noqa: F401  (re-exported)
from .divprune import DivPruneSelector
from .fastervlm import FasterVLMSelector
from .globalcom2 import BUDGETS, LAYOUTS, SCORES, THUMBNAIL_ORDERS, GlobalCom2Config, GlobalCom2Selector
from .visionzip import VisionZipSelector

ALLOCATIONS = ("globalcom2", "uniform")
THUMBNAILS = ("selector", "globalcom2")
#: the per-view selectors, by name: each is its standalone method's rule (``ViewSelector``)
SELECTOR_CLASSES: dict[str, type[ViewSelector]] = {
    s.name: s
    for s in (
        GlobalCom2Selector, FasterVLMSelector, CDPrunerSelector, DivPruneSelector, DARTSelector, VisionZipSelector,
    )
}  # fmt: skip
SELECTORS = tuple(SELECTOR_CLASSES)
#: option name -> the selectors that own it
_OWNERS: dict[str, list[str]] = {}
for _sel in SELECTOR_CLASSES.values():
    for _opt in _sel.options:
        _OWNERS.setdefault(_opt, []).append(_sel.name)


@dataclass(frozen=True)
class ComposedConfig(VisionMethod):
    """Options of ``composed`` (crop budgets by ``allocation``, tokens inside each crop by ``selector``).

    retention_ratio: R in (0, 1]; counts exactly as GlobalCom²'s with the same options.
    allocation: "globalcom2" (thumbnail-guided crop ratios, GlobalCom²'s default rule) or "uniform" (R each).
    selector: "globalcom2", "fastervlm", "cdpruner", "divprune", "dart" or "visionzip".
    thumbnail: "selector" (the selector picks the thumbnail's tokens) or "globalcom2" (top by [CLS]).
    temperature, score, thumbnail_order, layout, budget: as in ``GlobalCom2Config``.
    alpha, importance: selector "globalcom2" only (defaults 0.5, "global_local").
    text_pooling, negate: selector "cdpruner" only (defaults "mean", True).
    pivot_image_tokens, pivot_text_tokens: selector "dart" only (defaults 4, 4).
    contextual_share: selector "visionzip" only (default 10/64).
    """

    name = "composed"
    description = "GlobalCom²'s thumbnail-guided crop budgets (allocation=) with any per-crop selector (selector=)"
    paper = "GlobalCom²'s allocation x the newer methods' selectors (this library)"

    allocation: str = "globalcom2"
    selector: str = "globalcom2"
    thumbnail: str = "selector"
    temperature: float = 10.0
    score: str = "logits"
    thumbnail_order: str = "score"
    layout: str = "authors"
    budget: str = "authors"
    alpha: float | None = None
    importance: str | None = None
    text_pooling: str | None = None
    negate: bool | None = None
    pivot_image_tokens: int | None = None
    pivot_text_tokens: int | None = None
    contextual_share: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("allocation", self.allocation, ALLOCATIONS)
        check_choice("selector", self.selector, SELECTORS)
        check_choice("thumbnail", self.thumbnail, THUMBNAILS)
        check_choice("score", self.score, SCORES)
        check_choice("thumbnail_order", self.thumbnail_order, THUMBNAIL_ORDERS)
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("budget", self.budget, BUDGETS)
        own = SELECTOR_CLASSES[self.selector].options
        for option, owners in _OWNERS.items():
            if getattr(self, option) is not None and option not in own:
                takes = ", ".join(own) or "none"
                raise ValueError(
                    f"option {option} belongs to selector {' / '.join(map(repr, owners))}, not to "
                    f"selector={self.selector!r} (its options: {takes})"
                )
        _ = self.allocator  # validates temperature with GlobalCom²'s messages
        sel = SELECTOR_CLASSES[self.selector]
        sel.method(retention_ratio=self.retention_ratio, **self.selector_options)  # the selector's own messages

    # -- the two halves --------------------------------------------------------------------------

    @property
    def selector_options(self) -> dict[str, Any]:
        """The selector's own options, its standalone method's defaults where not given."""
        given = {name: getattr(self, name) for name in SELECTOR_CLASSES[self.selector].options}
        defaults = SELECTOR_CLASSES[self.selector].defaults()
        return {name: defaults[name] if value is None else value for name, value in given.items()}

    def option(self, name: str) -> Any:
        """The selector option ``name`` (the selector's default when not given)."""
        return self.selector_options[name]

    @property
    def allocator(self) -> GlobalCom2Config:
        """The GlobalCom² config whose budgets this runs (its crop ratios, counts and layout)."""
        return GlobalCom2Config(
            retention_ratio=self.retention_ratio,
            temperature=self.temperature,
            score=self.score,
            thumbnail_order=self.thumbnail_order,
            layout=self.layout,
            allocation="softmax_sum" if self.allocation == "globalcom2" else "uniform",
            budget=self.budget,
        )

    @property
    def requires(self) -> Requirements:
        """GlobalCom²'s [CLS] map, unpadding and layout, plus what the selector reads."""
        alloc = self.allocator.requires
        return Requirements(
            score_layer=alloc.score_layer, score=alloc.score, scorer=alloc.scorer, unpad=alloc.unpad,
            unpad_rounding=alloc.unpad_rounding, layout=alloc.layout, thumbnail_order=alloc.thumbnail_order,
            needs=SELECTOR_CLASSES[self.selector].needs,
        )  # fmt: skip

    # -- budgets (GlobalCom²'s) --------------------------------------------------------------------

    def content_dependence(self) -> str | None:
        """GlobalCom²'s: the crop ratios depend on the content unless budget="exact" or allocation="uniform"."""
        if self.allocator.content_dependence() is None:
            return None
        return (
            f"with budget='authors' and allocation={self.allocation!r}, method 'composed' keeps int(N_j r_j) "
            "tokens of crop j, which depends on the image's content; pass budget='exact' for a count that "
            "depends on the image size only"
        )

    def size_budget(self, ctx: ImageContext) -> tuple[int, torch.Tensor]:
        """(thumbnail tokens, (n,) crop tokens): GlobalCom²'s, see ``GlobalCom2Config.size_budget``."""
        return self.allocator.size_budget(ctx)

    # -- selection -------------------------------------------------------------------------------

    def select(self, ctx: ImageContext) -> Selection:
        """GlobalCom²'s counts per view, filled by the selector inside each view's candidates (thumbnail: all
        N; crop: its unpadded tokens)."""
        alloc = self.allocator
        ratios = alloc.crop_ratios(ctx)
        k0, k = alloc.budgets(ctx, ratios)  # int, (n,) long
        v, n_tok = ctx.scores.shape
        dev = ctx.scores.device
        valid = ctx.valid.to(dev)
        cand = torch.cat([torch.ones(1, n_tok, dtype=torch.bool, device=dev), valid])  # (V, N)
        counts = [k0, *k.tolist()]
        selector, options = SELECTOR_CLASSES[self.selector](), self.selector_options
        state = selector.prepare(ctx, options)
        picks, extras = [], []
        with torch.no_grad():
            for view in range(v):  # views, never tokens
                if view == 0 and self.thumbnail == "globalcom2":
                    picks.append(core.top_indices(ctx.thumbnail, k0))  # GlobalCom²'s rule: top int(N R) by [CLS]
                    continue
                pos = cand[view].nonzero().squeeze(1)  # (M,) candidates of this view
                chosen, extra = selector.pick(ctx, state, view, pos, counts[view], options)
                picks.append(chosen)
                if extra is not None:
                    extras.append(extra)
        keep = torch.zeros(v, n_tok, dtype=torch.bool, device=dev)
        for view, chosen in enumerate(picks[1:], start=1):
            keep[view, chosen.to(dev)] = True
        sel = Selection(picks[0], keep[1:], ratios)
        if not extras:
            return sel
        sel.extra = torch.cat(extras)  # (M_extra, D_vis): thumbnail's contextual tokens, then each crop's
        base = v * n_tok + 1  # first extra row in the emitted source
        sel.order = torch.cat([self.order(sel, ctx), base + torch.arange(sel.extra.shape[0], device=dev)])
        return sel
