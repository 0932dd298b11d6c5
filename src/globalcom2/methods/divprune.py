"""DivPrune: keep the most diverse visual tokens (greedy max-min on cosine distance).

Follows the authors' released code (github vbdi/divprune, ``LLaVA/llava/model/llava_arch.py``,
``DivPrune`` and its call in ``prepare_inputs_labels_for_multimodal``) on LLaVA-1.6:

* the candidates are the image's visual tokens exactly as stock LLaVA-NeXT feeds them to the
  language model: projected thumbnail tokens, unpadded crop tokens and the newline token after
  every unpadded row, in that order (``granularity="image"``);
* ``K = round(R T)`` of the ``T`` candidates are kept (their ``int(round(SUBSET_RATIO * len))``),
  so the language model receives R of the stock count;
* distance is ``1 - cos`` between projected features; the first token is the one whose nearest
  other token is farthest (second smallest entry of its column), then each step adds the token
  whose minimum distance to the tokens chosen so far is largest (max-min / farthest point);
* the kept tokens are emitted in their stock order (their ``keep_indexs.sort()``).

Departures (each with the reason and the option):

* a token already chosen is never chosen again (its score is set to -inf); their code leaves
  its self-distance (about 0) in the minimum, so it could be picked twice only once every other
  candidate duplicates a chosen one (e.g. the identical newline tokens near R = 1);
* distances are float32 (their run is float16), so near-ties may break differently;
* ``granularity="view"`` (not in their code) runs the same greedy inside each view (thumbnail,
  every crop's unpadded tokens) with ``round(R n_v)`` tokens each and emits them in raster order
  without newline tokens, so the count is R of the stock count less about R x (newline rows);
  the default ``"image"`` is theirs.
* unpadding: their ``unpad_image`` truncates the scaled size (``int(original_height * scale_factor)``)
  where transformers rounds it to 7 digits first; the library's candidates are stock transformers'
  sequence (``unpad_rounding="transformers"``). On rare sizes the two differ by whole rows: a 352x110 px
  image at 336 px views is 1360 stock tokens, 1262 in their code (``R T`` follows). ``unpad_rounding=
  "authors"`` takes their truncated sequence instead.

Qwen2.5-VL / Qwen3-VL: the DivPrune authors' README links a community Qwen2.5-VL port (Ironieser/MMTok,
``mmtok/qwen/``), which ``space="auto"`` follows there: the candidates are the image's merged tokens in
stock (raster) order and distance is measured on the tower's own vector of each merged token, the mean
of its m x m patches of the last vision block before the merger (``ImageContext.tower_features``;
``space="projected"`` measures on the merger's output instead). The port's departures not taken: it
keeps ``int(R T)`` over all images of a call together (here ``round(R T)`` per image, DivPrune's own
count, so a batch selects as each image alone and one R gives one count on every family: at most one
token apart), and it reads the first image's span only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import core
from .base import TRANSFORMERS_UNPAD_DIGITS, ImageContext, Requirements, Selection, ViewSelector, VisionMethod
from .checks import check_choice
from .sequence import selection_from_order, stock_length, stock_sequence

GRANULARITIES = ("image", "view")
#: where distances are measured: the family's choice, the projected (LLM input) features, the tower's own vectors
SPACES = ("auto", "projected", "tower")


def cosine_similarity(x: torch.Tensor, block: int = 512) -> torch.Tensor:
    """(T, T) float32 cosine similarity between the rows of x: (T, D), normalised as DivPrune does.

    Exactly symmetric: only blocks on and above the diagonal are multiplied (about half the FLOPs of
    the full product, the cost that dominates DivPrune at LLaVA-NeXT sizes) and mirrored below it.
    ``1 - cosine_similarity(x)`` is DivPrune's distance matrix, bit for bit.
    """
    x = x.float()
    normed = x / x.norm(dim=1, keepdim=True)  # (T, D)
    t = normed.shape[0]
    sim = torch.empty(t, t, dtype=normed.dtype, device=normed.device)
    for s in range(0, t, block):  # loop over row blocks, not tokens
        e = min(s + block, t)
        rows = normed[s:e] @ normed[s:].t()  # (b, T - s)
        sim[s:e, s:] = rows
        sim[s:, s:e] = rows.t()
    return sim


def cosine_distance(x: torch.Tensor, block: int = 512) -> torch.Tensor:
    """(T, T) float32 ``1 - cos`` between the rows of x: (T, D) (DivPrune's distance matrix)."""
    return cosine_similarity(x, block).neg_().add_(1.0)


def max_min_diverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy max-min subset of k rows of x: (T, D). returns (k,) long, in the order chosen.

    The distance matrix is made in place from the exactly symmetric similarity matrix (one (T, T)
    buffer), so the first pick reads every *row's* two smallest distances (contiguous, the same
    values as DivPrune's columns) and each later step reads one row, the newly chosen token's: an
    (T,) update per pick, no per-token Python work and no host sync.
    """
    t = x.shape[0]
    k = max(0, min(int(k), t))
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    if t == 1:
        return torch.zeros(1, dtype=torch.long, device=x.device)
    dist = cosine_similarity(x.detach()).neg_().add_(1.0)  # (T, T) 1 - cos; a selection, never differentiated
    nearest = dist.topk(2, dim=1, largest=False).values[:, 1]  # (T,) distance to the nearest other token
    picks = []
    for _ in range(k):  # the greedy is sequential: one vectorised step per chosen token
        j = nearest.argmax(dim=0, keepdim=True)  # (1,)
        picks.append(j)
        if len(picks) == 1:
            nearest = dist.index_select(0, j)[0].clone()  # (T,) min distance to the chosen set
        else:
            torch.minimum(nearest, dist.index_select(0, j)[0], out=nearest)  # (T,)
        nearest.index_fill_(0, j, -float("inf"))  # a chosen token is never chosen again
    return torch.cat(picks)


@dataclass(frozen=True)
class DivPruneConfig(VisionMethod):
    """DivPrune options.

    retention_ratio: R in (0, 1]; ``round(R T)`` of the T stock visual tokens are kept.
    granularity: "image" (DivPrune's code: one greedy over the whole stock sequence, newlines
        included) or "view" (one greedy per view, ``round(R n_v)`` each, no newlines).
    budget: "authors" or "exact"; accepted for symmetry with GlobalCom², changes nothing: the count
        already depends on the image size only (``globalcom2.num_image_tokens``).
    unpad_rounding: "transformers" (default: the candidates are the stock sequence transformers builds) or
        "authors" (their ``unpad_image``, which truncates: on rare sizes a row fewer per padded side).
    space: where the cosine distance is measured: "projected" (the features the LLM receives, DivPrune's
        LLaVA code), "tower" (the tower's own vector of each token before the projector, where the family
        defines one: Qwen-VL, as the DivPrune Qwen2.5-VL port), or "auto" (default: the family's choice,
        ``FamilyAdapter.auto_options``: "tower" on Qwen-VL, "projected" elsewhere).
    """

    name = "divprune"
    description = "DivPrune: greedy max-min diversity of the projected visual tokens (cosine distance)"
    paper = "DivPrune (Alvar et al., CVPR 2025)"

    granularity: str = "image"
    budget: str = "authors"
    unpad_rounding: str = "transformers"
    space: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("granularity", self.granularity, GRANULARITIES)
        check_choice("budget", self.budget, ("authors", "exact"))
        check_choice("unpad_rounding", self.unpad_rounding, ("transformers", "authors"))
        check_choice("space", self.space, SPACES)

    @property
    def requires(self) -> Requirements:
        """Stock LLaVA-NeXT's unpadded layout (transformers' rounding, or their truncation with
        ``unpad_rounding="authors"``), the projected features and (``space`` "tower") the tower's own vectors."""
        rounding = None if self.unpad_rounding == "authors" else TRANSFORMERS_UNPAD_DIGITS
        needs = {"features"} | ({"tower"} if self.space == "tower" else set())
        return Requirements(
            unpad=True, unpad_rounding=rounding, layout="spatial", thumbnail_order="spatial",
            needs=frozenset(needs),
        )  # fmt: skip

    def distance_source(self, ctx: ImageContext) -> torch.Tensor | None:
        """(V, N, D) detached vectors whose cosine distances the greedy reads: the tower's (``space="tower"``),
        else None (the projected features; "auto" unresolved by a family means "projected")."""
        if self.space != "tower":
            return None
        if ctx.tower_features is None:
            raise ValueError(
                "space='tower' needs the tower's own token vectors (ImageContext.tower_features), which this "
                "family does not define; use space='projected' or 'auto'"
            )
        return ctx.tower_features.detach()

    def _count(self, t: int) -> int:
        return min(max(int(round(self.retention_ratio * t)), 1), t) if t else 0

    def token_count(self, ctx: ImageContext) -> int:
        """Visual tokens of any image of this geometry: round(R T) of the T stock tokens (or per view)."""
        if self.granularity == "view":
            n_valid = [ctx.scores.shape[1]] if ctx.thumbnail_emitted else []
            n_valid += ctx.valid.sum(1).tolist()
            return sum(self._count(int(c)) for c in n_valid)
        return self._count(stock_length(ctx))

    def select(self, ctx: ImageContext) -> Selection:
        """The most diverse tokens of the image (or of each view), emitted in stock order."""
        stock, source = stock_sequence(ctx, "divprune")  # (T,), (V N + 1, D)
        tower = self.distance_source(ctx)
        if tower is not None:  # the same order over the tower's vectors (the newline row is never in it)
            source = torch.cat([tower.flatten(0, 1), tower.new_zeros(1, tower.shape[-1])]).to(stock.device)
        feats = source[:-1].view(*ctx.scores.shape, -1)  # (V, N, D)
        v, n_tok = ctx.scores.shape
        dev = feats.device
        with torch.no_grad():
            if self.granularity == "image":
                chosen = max_min_diverse(source[stock], self._count(stock.numel()))
                order = stock[chosen.sort().values]
            else:
                valid = ctx.valid.to(dev)
                keep = torch.zeros(v, n_tok, dtype=torch.bool, device=dev)
                cand = torch.cat([torch.ones(1, n_tok, dtype=torch.bool, device=dev), valid])  # (V, N)
                for view in range(0 if ctx.thumbnail_emitted else 1, v):  # one greedy per emitted view
                    pos = cand[view].nonzero().squeeze(1)
                    keep[view, pos[max_min_diverse(feats[view, pos], self._count(pos.numel()))]] = True
                thumb = keep[0].nonzero().squeeze(1)
                order = core.assemble_order(thumb, keep[1:], valid, ctx.grid, ctx.side, "flat")
        return selection_from_order(order, ctx)


class DivPruneSelector(ViewSelector):
    """DivPrune inside one view: the greedy max-min diversity of its candidates' projected features."""

    name = "divprune"
    method = DivPruneConfig
    needs = frozenset({"features"})

    def prepare(self, ctx: ImageContext, options: dict) -> dict:
        """The image's detached projected features."""
        return {"features": self.projected(ctx)}

    def pick(self, ctx: ImageContext, state: dict, view: int, pos: torch.Tensor, k: int, options: dict):
        """k candidates, in the order chosen."""
        return pos[max_min_diverse(state["features"][view, pos], k)], None
