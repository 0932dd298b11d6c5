"""VisionZip: dominant tokens by [CLS] attention plus contextual tokens merged by key similarity.

Follows the authors' released code (github dvlab-research/VisionZip, ``visionzip/clip_encoder.py``,
``utils.py`` and the LLaVA-NeXT path in ``llava_arch.py``), view by view:

* every view (thumbnail and each crop) keeps ``K = max(1, round(N R))`` tokens, split as their
  ``visionzip(model, dominant=54, contextual=10)`` split 64 (and 108+20, 162+30): ``C =
  round(K * 10 / 64)`` contextual tokens and ``K - C`` dominant tokens, the [CLS] token counted
  among the dominant ones;
* dominant: the [CLS] token and the ``K - C - 1`` patches with the largest [CLS] attention
  probabilities (summed over heads; here averaged, the same ranking) of the feature layer
  (``vision_feature_layer``, -2), taken from that layer's output hidden states in index order;
* contextual: the remaining patches, compared by their keys of the same layer averaged over
  heads and L2-normalised; every ``max(1, M // C)``-th one (the first C) is a target, every other
  token joins its most similar target, and a contextual token is the target's hidden state plus
  the mean hidden state of the tokens that joined it;
* all tokens are projected by the model's projector and emitted as their LLaVA-NeXT path does:
  the thumbnail's [CLS], dominant and contextual tokens, then the crops' dominant tokens in
  raster order of the whole (padded) crop grid, then each crop's [CLS] token, then each crop's
  contextual tokens; no unpadding, no newline tokens.

The language model therefore receives ``(1 + n) K`` visual tokens (``K`` = 64 per view gives the
paper's 320 of 2880 on a 2x2 grid).

Towers without a [CLS] token whose family gives its stock visual sequence (``ImageContext.cls_token``
False, ``stock_order`` set: Qwen2.5-VL / Qwen3-VL). VisionZip's authors released no code for such a
model (their repository has LLaVA's CLIP path only); this is how their algorithm reads there, as their
code runs on a single-view LLaVA-1.5 image: once over the image's T stock tokens, ``K = max(1, round(T
R))`` of them, ``C = round(K share)`` contextual and ``K - C`` dominant tokens (no [CLS] to count among
them) by the family's score (attention received), the contextual merge as above on the rows of
``hidden`` (the family's vision-space rows, which its projector turns into LLM tokens) compared by
``keys``; each contextual token takes the place of its target token (``Selection.extra_at``), and the
dominant ones keep theirs.

Departures from their code (each with the reason):

* the [CLS] attention and the keys are recomputed in float32 from the hidden state entering the
  layer (``layer_norm1``, ``q_proj``/``k_proj``), so any attention kernel works (their code needs
  eager attention maps and patches ``CLIPAttention.forward`` for every model in the process);
  near-ties may rank differently from their half-precision run.
* the hidden states are merged and projected per image instead of over the whole batch, so a
  batch gives the same tokens as each image alone (the projector sees the same rows).
* ``contextual_share`` (default 10/64, theirs) and R replace their fixed ``dominant``/``contextual``
  counts; ``K = 64`` reproduces ``dominant=54, contextual=10`` exactly.
* the stock cap: every view keeps K tokens of the padded grid, so for R < 1 an image with much letterbox
  padding at a high R would get more tokens than stock LLaVA-NeXT feeds its LLM (3x1000 px already at
  R = 0.5: 1152 where stock sends 576; their code does). K is then lowered to ``stock // (1 + n)`` so
  that ``(1 + n) K`` is at most stock's count; where their K fits (every image at the usual R <= 0.75
  but very thin ones) it is kept exactly. R = 1 keeps every view whole, as theirs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import core
from .base import ImageContext, Requirements, Selection, ViewSelector, VisionMethod
from .checks import check_choice, check_number, check_scorer
from .sequence import selection_from_order, stock_length, stock_order

#: VisionZip's released split: ``visionzip(model, dominant=54, contextual=10)`` keeps 64 tokens a view, 10 merged
CONTEXTUAL_SHARE = 10 / 64


def visionzip_split(k: int, contextual_share: float) -> tuple[int, int]:
    """(dominant incl. [CLS], contextual) tokens of a view that keeps ``k``: 64 -> (54, 10) at share 10/64."""
    c = int(round(k * contextual_share))
    c = min(c, k - 1) if k > 1 else 0
    return k - c, c


def contextual_targets(m: int, c: int, device=None) -> torch.Tensor:
    """(c,) long, which of the ``m`` non-dominant tokens (ascending) VisionZip's merge makes targets: every
    ``max(1, m // c)``-th one, the first c."""
    return torch.arange(0, m, max(1, m // c), device=device)[:c]


def merge_contextual(hidden: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor, c: int) -> torch.Tensor:
    """Contextual tokens of every view, VisionZip's key-similarity merge.

    hidden: (V, 1 + N, D) hidden states; keys: (V, 1 + N, d) merge metric; rest: (V, M) long,
    positions (in the 1 + N sequence, ascending) of the tokens that are not dominant; c >= 1.
    returns: (V, c, D) target hidden state + mean hidden state of the tokens assigned to it.
    """
    v, m = rest.shape
    metric = keys.gather(1, rest[..., None].expand(v, m, keys.shape[-1]))  # (V, M, d)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    h = hidden.gather(1, rest[..., None].expand(v, m, hidden.shape[-1]))  # (V, M, D)
    target = contextual_targets(m, c, rest.device)  # (c,)
    is_target = torch.zeros(m, dtype=torch.bool, device=rest.device)
    is_target[target] = True
    others = (~is_target).nonzero().squeeze(1)  # (M - c,)
    sim = torch.bmm(metric[:, others], metric[:, target].transpose(1, 2))  # (V, M - c, c)
    assign = F.one_hot(sim.argmax(dim=2), c).to(h.dtype)  # (V, M - c, c)
    counts = assign.sum(dim=1).clamp(min=1).unsqueeze(-1)  # (V, c, 1)
    merged = torch.bmm(assign.transpose(1, 2), h[:, others]) / counts  # (V, c, D)
    return h[:, target] + merged


@dataclass(frozen=True)
class VisionZipConfig(VisionMethod):
    """VisionZip options.

    retention_ratio: R in (0, 1]; every view keeps ``K = max(1, round(N R))`` tokens (for R < 1 at most
        ``stock // (1 + n)``, so that no image gets more tokens than stock; see the module docstring).
    contextual_share: share of K given to merged contextual tokens, ``C = round(K share)``
        (VisionZip's 10 of 64).
    budget: "authors" or "exact"; accepted for symmetry with GlobalCom², changes nothing: the count
        ``(1 + n) K`` already depends on the image size only (``globalcom2.num_image_tokens``).
    scorer: how dominant tokens are rated: "auto" (= "cls", VisionZip's [CLS] attention), "cls",
        "attention_received" or "global_dissimilarity" (``globalcom2.models.scoring``).
    """

    name = "visionzip"
    description = "VisionZip: per view, dominant tokens by [CLS] attention + contextual tokens merged by key similarity"
    paper = "VisionZip (Yang et al., CVPR 2025)"

    contextual_share: float = CONTEXTUAL_SHARE
    scorer: str = "auto"
    budget: str = "authors"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_scorer(self.scorer)
        check_number("contextual_share", self.contextual_share, 0.0, 1.0, low_open=False, high_open=True)
        check_choice("budget", self.budget, ("authors", "exact"))

    @property
    def requires(self) -> Requirements:
        """Attention probabilities of the feature layer (VisionZip's ``attentions[-2]``), the padded crop grid
        (their LLaVA-NeXT path), the feature layer's hidden states and the score layer's keys."""
        return Requirements(
            score_layer=None, score="softmax", scorer=self.scorer, unpad=False, layout="flat",
            thumbnail_order="spatial", needs=frozenset({"hidden", "keys"}),
        )  # fmt: skip

    def view_budget(self, n_tokens: int) -> int:
        """Tokens kept of a view with ``n_tokens`` patches (before the stock cap, ``image_budget``)."""
        return min(max(1, round(n_tokens * self.retention_ratio)), n_tokens)

    def image_budget(self, ctx: ImageContext) -> int:
        """K, the tokens every view of this geometry keeps: ``view_budget``, for R < 1 held so that the (1 + n)
        views together keep at most the stock count (``core.hold_views``)."""
        v, n_tok = ctx.scores.shape
        k = self.view_budget(n_tok)
        if self.retention_ratio >= 1:
            return k
        return int(core.hold_views(torch.full((v,), k), stock_length(ctx)).min())

    def token_count(self, ctx: ImageContext) -> int:
        """Visual tokens of any image of this geometry: K per view ([CLS] + dominant + contextual), (1 + n) K;
        without a [CLS] token, K of the image's T stock tokens."""
        if not ctx.cls_token:
            return self.view_budget(stock_length(ctx))
        return ctx.scores.shape[0] * self.image_budget(ctx)

    def select(self, ctx: ImageContext) -> Selection:
        """Dominant + contextual tokens of every view, emitted in VisionZip's LLaVA-NeXT order (towers without a
        [CLS] token: of the image's stock tokens, ``select_sequence``)."""
        if ctx.hidden is None or ctx.keys is None:
            raise ValueError("visionzip needs the feature layer's hidden states and keys (ImageContext.hidden/keys)")
        if not ctx.cls_token:
            return self.select_sequence(ctx)
        scores = ctx.scores  # (V, N)
        v, n_tok = scores.shape
        n = v - 1
        k = self.image_budget(ctx)
        n_dom, c = visionzip_split(k, self.contextual_share)
        with torch.no_grad():
            top = scores.topk(n_dom - 1, dim=1).indices.sort(dim=1).values  # (V, n_dom - 1) patch indices
            keep = torch.zeros(v, n_tok, dtype=torch.bool, device=scores.device)
            keep.scatter_(1, top, True)  # (V, N) dominant patches
        hidden = ctx.hidden  # (V, 1+N, D_vis)
        cls = hidden[:, 0]  # (V, D_vis)
        if c > 0:
            rest = (~keep).nonzero()[:, 1].view(v, n_tok - (n_dom - 1)) + 1  # (V, M) positions in 1+N
            ctx_tokens = merge_contextual(hidden, ctx.keys.to(hidden.device), rest.to(hidden.device), c)
        else:
            ctx_tokens = hidden.new_zeros(v, 0, hidden.shape[-1])
        # extra rows: [CLS_0, ctx_0 (c), CLS_1..n, ctx_1..n (n c)]
        extra = torch.cat([cls[:1], ctx_tokens[0], cls[1:], ctx_tokens[1:].flatten(0, 1)], dim=0)
        base = v * n_tok + 1  # first extra row in the source
        dev = scores.device
        ar = torch.arange
        thumb = top[0]
        crops = core.assemble_order(thumb[:0], keep[1:], ctx.valid, ctx.grid, ctx.side, "flat")
        order = torch.cat([
            base + ar(1, device=dev), thumb, base + 1 + ar(c, device=dev),  # thumbnail: [CLS], dominant, contextual
            crops,  # crops' dominant tokens, raster order of the whole grid
            base + 1 + c + ar(n, device=dev),  # crops' [CLS]
            base + 1 + c + n + ar(n * c, device=dev),  # crops' contextual tokens
        ])  # fmt: skip
        ratios = torch.full((n,), k / n_tok, dtype=torch.float64)
        return Selection(thumb, keep[1:], ratios, extra=extra, order=order)

    def select_sequence(self, ctx: ImageContext) -> Selection:
        """A tower without [CLS]: ``K - C`` dominant tokens of the image's T stock tokens by score and ``C``
        contextual ones, each standing at its target (``extra_at``); emitted dominant first, in stock order."""
        v, n_tok = ctx.scores.shape
        stock = stock_order(ctx).to(ctx.scores.device)  # (T,) context indices, stock order
        k = self.view_budget(stock.numel())
        n_dom, c = visionzip_split(k, self.contextual_share)
        with torch.no_grad():
            dom = ctx.scores.flatten()[stock].topk(n_dom).indices.sort().values  # (n_dom,) into the stock sequence
        base = v * n_tok + 1  # first extra row in the source
        order = stock[dom]
        sel_extra = extra_at = None
        if c > 0:
            hidden = ctx.hidden.flatten(0, 1)[stock.to(ctx.hidden.device)]  # (T, D) the family's vision-space rows
            keys = ctx.keys.flatten(0, 1)[stock.to(ctx.keys.device)].to(hidden.device)  # (T, d)
            rest = torch.ones(stock.numel(), dtype=torch.bool, device=stock.device)
            rest[dom] = False
            rest = rest.nonzero().squeeze(1)  # (M,) ascending
            sel_extra = merge_contextual(hidden[None], keys[None], rest[None].to(hidden.device), c)[0]  # (C, D)
            extra_at = stock[rest[contextual_targets(rest.numel(), c, rest.device)]]  # (C,) context indices
            order = torch.cat([order, base + torch.arange(c, device=order.device)])
        sel = selection_from_order(order, ctx)
        sel.extra, sel.extra_at = sel_extra, extra_at
        return sel


class VisionZipSelector(ViewSelector):
    """VisionZip inside one view: ``k - C`` dominant patches by [CLS] attention, ``C`` merged contextual tokens."""

    name = "visionzip"
    method = VisionZipConfig
    options = ("contextual_share",)
    needs = frozenset({"hidden", "keys"})

    def prepare(self, ctx: ImageContext, options: dict) -> dict:
        """Nothing to share; checks the hidden states and keys are there."""
        if ctx.hidden is None or ctx.keys is None:
            raise ValueError("selector 'visionzip' needs the hidden states and keys (ImageContext.hidden/keys)")
        return {}

    def pick(self, ctx: ImageContext, state: dict, view: int, pos: torch.Tensor, k: int, options: dict):
        """(n_dom,) dominant positions best first, (C, D_vis) contextual tokens (None when C = 0)."""
        n_dom, c = visionzip_split(k, options["contextual_share"])
        top = torch.topk(ctx.scores[view, pos], n_dom).indices  # (n_dom,) best first
        if c == 0:
            return pos[top], None
        rest = torch.ones(pos.numel(), dtype=torch.bool, device=pos.device)
        rest[top] = False
        rest_pos = pos[rest] + 1  # (M - n_dom,) ascending positions in the [CLS]-first sequence
        hidden = ctx.hidden[view : view + 1]  # (1, 1 + N, D_vis)
        merged = merge_contextual(hidden, ctx.keys[view : view + 1].to(hidden.device), rest_pos[None], c)
        return pos[top], merged[0]
