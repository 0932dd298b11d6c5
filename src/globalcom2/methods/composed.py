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
from .base import ImageContext, MethodConfig, Selection, check_choice
from .cdpruner import CDPrunerConfig, dpp_greedy, instruction_relevance
from .dart import DARTConfig
from .divprune import max_min_diverse
from .globalcom2 import BUDGETS, LAYOUTS, SCORES, THUMBNAIL_ORDERS, GlobalCom2Config
from .visionzip import VisionZipConfig, merge_contextual, visionzip_split

ALLOCATIONS = ("globalcom2", "uniform")
SELECTORS = ("globalcom2", "fastervlm", "cdpruner", "divprune", "dart", "visionzip")
THUMBNAILS = ("selector", "globalcom2")

#: each selector's own options and their defaults (None in the config means "the selector's default")
SELECTOR_OPTIONS: dict[str, dict[str, Any]] = {
    "globalcom2": {"alpha": 0.5, "importance": "global_local"},
    "fastervlm": {},
    "cdpruner": {"text_pooling": "mean", "negate": True},
    "divprune": {},
    "dart": {"pivot_image_tokens": 4, "pivot_text_tokens": 4},
    "visionzip": {"contextual_share": 10 / 64},
}
#: optional ``ImageContext`` inputs each selector reads
SELECTOR_NEEDS: dict[str, frozenset[str]] = {
    "globalcom2": frozenset(),
    "fastervlm": frozenset(),
    "cdpruner": frozenset({"features", "text"}),
    "divprune": frozenset({"features"}),
    "dart": frozenset({"features", "text"}),
    "visionzip": frozenset({"hidden", "keys"}),
}


def pivot_quota(extra: int, n_pivots: int) -> torch.Tensor:
    """(P,) long: ``extra`` tokens split over P pivots as evenly as possible, the first ones taking one more."""
    if n_pivots == 0:
        return torch.zeros(0, dtype=torch.long)
    p = torch.arange(n_pivots)
    return extra // n_pivots + (p < extra % n_pivots).long()


def dart_keep_exact(
    tokens: torch.Tensor, text: torch.Tensor | None, k: int, n_image_pivots: int, n_text_pivots: int
) -> torch.Tensor:
    """(k,) long ascending rows of tokens: (M, D) kept by DART's pivots with exactly k tokens in all.

    Image pivots: the ``min(n_image_pivots, k)`` rows of largest L1 norm (kept); text pivots: the
    ``n_text_pivots`` rows of ``text`` (M_t, D) of largest L1 norm. Each pivot in turn takes its quota
    (``pivot_quota``) of the free rows least cosine-similar to it. One vectorised step per pivot.
    """
    m = tokens.shape[0]
    k = max(0, min(int(k), m))
    x = tokens.float()
    p_img = min(n_image_pivots, k)
    img_piv = x.abs().sum(-1).topk(p_img).indices  # (P_img,)
    txt = None if text is None or text.shape[0] == 0 else text.float().to(x.device)
    p_txt = 0 if txt is None else min(n_text_pivots, txt.shape[0])
    pivots = x[img_piv]
    if p_txt:
        pivots = torch.cat([pivots, txt[txt.abs().sum(-1).topk(p_txt).indices]])  # (P, D)
    kept = torch.zeros(m, dtype=torch.bool, device=x.device)
    kept[img_piv] = True
    quota = pivot_quota(k - p_img, pivots.shape[0]).tolist()
    if k > p_img:
        normed = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)  # (M, D)
        pnormed = pivots / pivots.norm(dim=-1, keepdim=True).clamp(min=1e-8)  # (P, D)
        dissim = -(pnormed @ normed.t())  # (P, M), higher = less duplicated
        for p, q in enumerate(quota):  # pivots in turn, never tokens
            score = dissim[p].masked_fill(kept, -float("inf"))  # (M,)
            kept[torch.sort(score, descending=True, stable=True).indices[:q]] = True
    return kept.nonzero().squeeze(1)


@dataclass(frozen=True)
class ComposedConfig(MethodConfig):
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
    paper = "GlobalCom² allocation x newer selectors (issue 12)"

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
        own = SELECTOR_OPTIONS[self.selector]
        for option, owners in _OWNERS.items():
            if getattr(self, option) is not None and option not in own:
                takes = ", ".join(own) or "none"
                raise ValueError(
                    f"option {option} belongs to selector {' / '.join(map(repr, owners))}, not to "
                    f"selector={self.selector!r} (its options: {takes})"
                )
        _ = self.allocator  # validates temperature, alpha, importance with GlobalCom²'s messages
        self._selector_config()  # validates the selector's own options with its own messages

    # -- the two halves --------------------------------------------------------------------------

    def option(self, name: str) -> Any:
        """The selector option ``name`` (the selector's default when not given)."""
        value = getattr(self, name)
        return SELECTOR_OPTIONS[self.selector][name] if value is None else value

    @property
    def allocator(self) -> GlobalCom2Config:
        """The GlobalCom² config whose budgets (and, for selector="globalcom2", crop importance) this runs."""
        own = SELECTOR_OPTIONS["globalcom2"]
        return GlobalCom2Config(
            retention_ratio=self.retention_ratio,
            alpha=own["alpha"] if self.alpha is None else self.alpha,
            temperature=self.temperature,
            score=self.score,
            thumbnail_order=self.thumbnail_order,
            layout=self.layout,
            allocation="softmax_sum" if self.allocation == "globalcom2" else "uniform",
            importance=own["importance"] if self.importance is None else self.importance,
            budget=self.budget,
        )

    def _selector_config(self) -> MethodConfig | None:
        """The selector's own standalone config (validates its options), or None for the [CLS] selectors."""
        r = self.retention_ratio
        if self.selector == "cdpruner":
            return CDPrunerConfig(r, text_pooling=self.option("text_pooling"), negate=self.option("negate"))
        if self.selector == "dart":
            return DARTConfig(
                r,
                form="embedding",  # a per-crop selector runs before the language model
                pivot_image_tokens=self.option("pivot_image_tokens"),
                pivot_text_tokens=self.option("pivot_text_tokens"),
            )
        if self.selector == "visionzip":
            return VisionZipConfig(r, contextual_share=self.option("contextual_share"))
        return None

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        """What the selector reads beyond the [CLS] scores."""
        return SELECTOR_NEEDS[self.selector]

    # -- budgets (GlobalCom²'s) --------------------------------------------------------------------

    @property
    def content_independent(self) -> bool:
        """Whether the number of kept tokens depends on the image size only (not on its pixels)."""
        return self.allocator.content_independent

    def fixed_budget(self, ctx: ImageContext) -> tuple[int, torch.Tensor]:
        """(thumbnail tokens, (n,) crop tokens): GlobalCom²'s, see ``GlobalCom2Config.fixed_budget``."""
        if not self.content_independent:
            raise ValueError(
                f"with budget='authors' and allocation={self.allocation!r}, method 'composed' keeps int(N_j r_j) "
                "tokens of crop j, which depends on the image's content; pass budget='exact' for a count that "
                "depends on the image size only"
            )
        return self.allocator.fixed_budget(ctx)

    # -- selection -------------------------------------------------------------------------------

    def select(self, ctx: ImageContext) -> Selection:
        """GlobalCom²'s counts per view, filled by the selector inside each view."""
        alloc = self.allocator
        ratios = alloc.crop_ratios(ctx)
        k0, k = alloc.budgets(ctx, ratios)  # int, (n,) long
        if self.selector == "globalcom2":  # GlobalCom² itself: same calls, same tokens
            crop_keep = core.keep_top_per_row(alloc.crop_importance(ctx), ctx.valid, k)
            return Selection(self._cls_thumbnail(ctx, k0), crop_keep, ratios)
        if self.selector == "fastervlm":
            crop_keep = core.keep_top_per_row([row[m] for row, m in zip(ctx.crops, ctx.valid)], ctx.valid, k)
            return Selection(self._cls_thumbnail(ctx, k0), crop_keep, ratios)
        return self._select_by_views(ctx, k0, k, ratios)

    def _cls_thumbnail(self, ctx: ImageContext, k0: int) -> torch.Tensor:
        """(k0,) thumbnail tokens by [CLS] attention, best first."""
        return core.top_indices(ctx.thumbnail, k0)

    def _select_by_views(self, ctx: ImageContext, k0: int, k: torch.Tensor, ratios: torch.Tensor) -> Selection:
        """Run the selector view by view over each view's candidates (thumbnail: all N; crop: unpadded)."""
        v, n_tok = ctx.scores.shape
        dev = ctx.scores.device
        valid = ctx.valid.to(dev)
        cand = torch.cat([torch.ones(1, n_tok, dtype=torch.bool, device=dev), valid])  # (V, N)
        counts = [k0, *k.tolist()]
        state = self._prepare(ctx)
        picks, extras = [], []
        with torch.no_grad():
            for view in range(v):  # views, never tokens
                pos = cand[view].nonzero().squeeze(1)  # (M,) candidates of this view
                if view == 0 and self.thumbnail == "globalcom2":
                    picks.append(self._cls_thumbnail(ctx, k0))
                    continue
                chosen, extra = self._pick(ctx, state, view, pos, counts[view])
                picks.append(chosen)
                if extra is not None:
                    extras.append(extra)
        keep = torch.zeros(v, n_tok, dtype=torch.bool, device=dev)
        for view, chosen in enumerate(picks[1:], start=1):
            keep[view, chosen] = True
        sel = Selection(picks[0], keep[1:], ratios)
        if not extras:
            return sel
        sel.extra = torch.cat(extras)  # (M_extra, D_vis): thumbnail's contextual tokens, then each crop's
        base = v * n_tok + 1  # first extra row in the emitted source
        sel.order = torch.cat([self._assemble(sel, ctx), base + torch.arange(sel.extra.shape[0], device=dev)])
        return sel

    def _assemble(self, sel: Selection, ctx: ImageContext) -> torch.Tensor:
        """GlobalCom²'s emission of the kept patches (thumbnail, then crops in ``layout``)."""
        thumb = sel.thumb_keep.sort().values if self.thumbnail_order == "spatial" else sel.thumb_keep
        return core.assemble_order(thumb, sel.crop_keep, ctx.valid, ctx.grid, ctx.side, self.layout_name, ctx.box)

    def _prepare(self, ctx: ImageContext) -> dict[str, Any]:
        """Per-image inputs the selector shares across views (CDPruner's relevance, normalised over the image)."""
        if self.selector in ("cdpruner", "divprune", "dart") and ctx.features is None:
            raise ValueError(f"selector {self.selector!r} needs the projected features (ImageContext.features)")
        if self.selector == "visionzip" and (ctx.hidden is None or ctx.keys is None):
            raise ValueError("selector 'visionzip' needs the hidden states and keys (ImageContext.hidden/keys)")
        state: dict[str, Any] = {}
        if self.selector in ("cdpruner", "divprune", "dart"):
            feats = ctx.features.detach()  # (V, N, D)
            state["features"] = feats
            if self.selector == "cdpruner":
                pooling, negate = self.option("text_pooling"), self.option("negate")
                state["relevance"] = instruction_relevance(feats, ctx.text, pooling, negate)  # (V, N)
        return state

    def _pick(
        self, ctx: ImageContext, state: dict[str, Any], view: int, pos: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(chosen (k',) long positions of ``view`` in the selector's order, optional (C, D_vis) merged tokens).

        pos: (M,) candidate positions of the view. k' = k except for VisionZip (k - C dominant patches).
        """
        if self.selector == "divprune":
            return pos[max_min_diverse(state["features"][view, pos], k)], None
        if self.selector == "cdpruner":
            x = state["features"][view, pos].float()  # (M, D)
            x = x / x.norm(dim=-1, keepdim=True)
            rel = state["relevance"][view, pos]  # (M,)
            kernel = rel[:, None] * (x @ x.t()) * rel[None, :]  # (M, M)
            return pos[dpp_greedy(kernel[None], k)[0]], None
        if self.selector == "dart":
            keep = dart_keep_exact(
                state["features"][view, pos], ctx.text, k, self.option("pivot_image_tokens"),
                self.option("pivot_text_tokens"),
            )  # fmt: skip
            return pos[keep], None
        # visionzip: k - C dominant patches by [CLS] attention, C contextual tokens merged from the rest
        n_dom, c = visionzip_split(k, self.option("contextual_share"))
        scores = ctx.scores[view, pos]  # (M,)
        top = torch.topk(scores, n_dom).indices  # (n_dom,) best first
        if c == 0:
            return pos[top], None
        rest = torch.ones(pos.numel(), dtype=torch.bool, device=pos.device)
        rest[top] = False
        rest_pos = pos[rest] + 1  # (M - n_dom,) ascending positions in the [CLS]-first sequence
        hidden = ctx.hidden[view : view + 1]  # (1, 1 + N, D_vis)
        merged = merge_contextual(hidden, ctx.keys[view : view + 1].to(hidden.device), rest_pos[None], c)
        return pos[top], merged[0]  # (n_dom,), (C, D_vis)


_OWNERS: dict[str, list[str]] = {}
for _sel, _opts in SELECTOR_OPTIONS.items():
    for _opt in _opts:
        _OWNERS.setdefault(_opt, []).append(_sel)
