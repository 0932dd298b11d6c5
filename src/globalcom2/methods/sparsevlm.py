"""SparseVLM: text-guided progressive pruning inside the language model, with token recycling.

Follows SparseVLM's released v1.5 code (github Gumpest/SparseVLMs, tag ``v1.5``: ``score.py``,
``modelling_sparse_llama.py``, ``utils.py``), the release with ratio-like token schedules (the
GlobalCom² paper cites SparseVLM's 2024 preprint and does not name a code version);
``docs/fidelity.md`` lists every difference from the released code, with numbers.

* **Raters.** Once per prompt, from the LLM's input embeddings: with V the visual tokens and T the
  text after the image (question and template, to the end of the prompt),
  ``m = softmax_T(V T^T).mean_V``; the text tokens with ``m > mean(m)`` rate the visual tokens.
* **Progressive pruning.** Each layer ``l`` of ``layers`` (default 2, 6, 15, as v1.5) runs in full;
  its head-mean attention probabilities from the raters to the visual tokens, averaged over the
  raters, rank the visual tokens, and only the top ``k`` pass on to layer ``l + 1``.
* **Recycling.** Of the deleted visual tokens (layer ``l``'s outputs), the top ``int(0.3 n_del) + 1``
  by score are clustered with DPC-kNN into ``int(n / 10) + 1`` clusters; each cluster's mean
  (v1.5's weights: ``sum / (count + 1e-6)``) becomes a new visual token, placed after the kept
  ones (before the text). Later stages rank and prune those like any other visual token.

Schedule (``counting="v15"``, the default). v1.5 takes a label N in {64, 128, 192} and, for its
576 visual tokens, keeps the table's count ``K_N = (300, 200, 110)``, ``(303, 110, 36)``,
``(66, 30, 17)`` of *original* tokens per stage (``topk(min(K, v - 1))``: at least one token is
deleted per stage) and adds the recycled cluster tokens **on top**. Here ``retention_ratio`` R
plays the label's part, ``R = N / 576``: for any R and an image of V visual tokens (every visual
token of the row: LLaVA-NeXT's thumbnail, crops and newlines), the kept fractions are the
piecewise-linear interpolation in R of ``K_N / 576`` through the anchors ``R = 0 -> (0, 0, 0)``,
``64/576``, ``128/576``, ``192/576`` and ``R = 1 -> (1, 1, 1)``, and at stage i, with ``c``
visual tokens present::

    kept_i = min(max(floor(f_i(R) V + 1/2), 1), c - 1)        clusters_i = int((int(0.3 (c - kept_i)) + 1) / 10) + 1

so R = 192/576 on a 576-token image keeps 300/200/110 and adds 9/4/3 clusters (stages of
309/204/113 tokens), token for token what ``--retained_tokens 192`` runs. R is a nominal share,
as v1.5's label is: with the default layers on a 32-layer LLM the visual tokens present on
average over the layers (counted as v1.5's own ``equal token num`` print counts them, see
``layer_average``) come to 192.03, 128.6 and 64.8 of 576 at the three labels, and stay within
about 1% of R between them (0.2514 at R = 0.25 on 576 tokens, 0.2500 on 2880); below R = 64/576
the recycled tokens and the full layers before ``l0`` dominate (0.071 at R = 0.01).

``counting="inclusive"`` (the rule of globalcom2 0.1.0) instead makes R the exact layer average:
the stage *sizes* (kept + clusters) are the table's counts, interpolated so that
``(l0 V + (l1 - l0) c1 + (l2 - l1) c2 + (n - l2) c3) / (n V) = R`` up to rounding, and each size
is split into kept tokens and the clusters recycling makes (recycled tokens counted inside; a
size below the cluster count keeps that many top tokens, where 0.1.0 kept only clusters). R
below ``l0 / n`` is unreachable then and refused.

Departures, each for a reason (details and numbers in ``docs/fidelity.md``):

* Batches: the released code assumes batch size 1; each row is pruned on its own here.
* LLaVA-NeXT: there is no released LLaVA-NeXT path (v1.5 hard-codes 576 tokens after a system
  prompt); here V is the row's whole visual span, and R = 1 leaves the row untouched (v1.5 always
  deletes one token per stage and re-adds it as a one-member cluster).
* Positions: v1.5 renumbers positions contiguously after each pruning. Here kept tokens keep their
  rotary positions (like FastV) and recycled tokens take the position of the image's last visual
  token (just before the text, where v1.5 places them), so decoding positions stay the ones
  ``transformers`` assigns and a sample decodes the same alone or in a batch.
* Ties: the clustering's random density tie-break (``1e-6 rand``) is an exact deterministic one
  (equal densities: the earlier, higher-scored token counts as denser); rankings break score ties
  by sequence order. Scores, raters and clustering run in float32 (distances in float64).
* Several images per prompt: raters are the text after the last image; all visual tokens of the
  row compete in one ranking and the recycled tokens go after the last visual token.
* No text after the last image (``"USER: describe this : <image>"``; v1.5's mean over an empty
  set gives NaN scores): the row's last token rates (FastV's criterion; it is the only position
  that attends to every visual token), re-found at each stage. A row without visual tokens (a
  text-only row in the batch) or with at most one left is passed through unchanged.
* Version 1.0 (the October 2024 code) pruned at four layers (2, 6, 15, 19) and kept
  ``int(rank * scale + bias)`` tokens per stage, with ``rank`` the matrix rank of the rater-to-visual
  attention and per-benchmark ``scale``/``bias`` in its scripts; that rule is not implemented.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import LLMMethod, PruneContext, Stage
from .checks import check_choice

#: v1.5's released schedules (576 visual tokens, pruning after layers 2/6/15): label -> original tokens kept per stage
RELEASED = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
RELEASED_TOKENS = 576
RECYCLE_SHARE = 0.3  # share of the deleted tokens that are clustered
CLUSTER_SIZE = 10  # about one cluster per this many clustered tokens
MERGE_EPS = 1e-6  # v1.5 divides a cluster's sum by (members + 1e-6)
COUNTING = ("v15", "inclusive")


def recycled(n_deleted: int) -> int:
    """Cluster tokens made from ``n_deleted`` deleted tokens, as v1.5: int((int(0.3 n) + 1) / 10) + 1."""
    return int((int(n_deleted * RECYCLE_SHARE) + 1) / CLUSTER_SIZE) + 1 if n_deleted > 0 else 0


def released_totals(keep: tuple[int, ...], n_visual: int = RELEASED_TOKENS) -> tuple[int, ...]:
    """Visual tokens per stage when a released keep schedule runs as v1.5 does (kept + clusters)."""
    out, current = [], n_visual
    for k in keep:
        k = min(k, current - 1)  # v1.5 always deletes at least one token
        current = k + recycled(current - k)
        out.append(current)
    return tuple(out)


def _interpolate(x: float, anchors: list[tuple[float, tuple[float, ...]]]) -> tuple[float, ...]:
    """Piecewise-linear value at ``x`` of anchors (x_j, values_j) sorted by x_j; clamped at both ends."""
    x = min(max(x, anchors[0][0]), anchors[-1][0])
    for (x0, f0), (x1, f1) in zip(anchors, anchors[1:]):
        if x0 <= x <= x1:
            t = 0.0 if x1 == x0 else (x - x0) / (x1 - x0)
            return tuple(a + t * (b - a) for a, b in zip(f0, f1))
    return anchors[-1][1]  # pragma: no cover - x is clamped into the anchors' range


@dataclass(frozen=True)
class SparseVLMConfig(LLMMethod):
    """SparseVLM options.

    retention_ratio: R in (0, 1]; "v15": the released label's share (R = N / 576 runs v1.5's schedule N),
        "inclusive": the share of visual tokens present on average over the decoder layers.
    layers: the three decoder layers whose attention prunes their output (strictly increasing).
    recycle: merge part of the deleted tokens back as cluster means (SparseVLM's token recycling).
    counting: "v15" (the schedule counts kept original tokens, recycled ones come on top, as released)
        or "inclusive" (stage sizes count the recycled tokens and average to R over the layers).
    """

    name = "sparsevlm"
    description = "SparseVLM: text-guided progressive pruning inside the LLM with token recycling"
    paper = "SparseVLM [19] (Zhang et al., ICML 2025)"

    layers: tuple[int, ...] = (2, 6, 15)
    recycle: bool = True
    counting: str = "v15"

    def __post_init__(self) -> None:
        super().__post_init__()
        layers = tuple(self.layers) if isinstance(self.layers, (list, tuple)) else None
        if (
            layers is None
            or len(layers) != 3
            or any(isinstance(x, bool) or not isinstance(x, int) for x in layers)
            or layers[0] < 0
            or any(b <= a for a, b in zip(layers, layers[1:]))
        ):
            raise ValueError(f"layers must be three strictly increasing layer indices >= 0, got {self.layers!r}")
        object.__setattr__(self, "layers", layers)
        if not isinstance(self.recycle, bool):
            raise TypeError(f"recycle must be True or False, got {self.recycle!r}")
        check_choice("counting", self.counting, COUNTING)

    def check_model(self, model) -> None:
        """Every pruning layer must be followed by another layer; an "inclusive" R must be reachable."""
        n = model.config.text_config.num_hidden_layers
        if self.layers[-1] >= n - 1:
            raise ValueError(f"layers must all be < {n - 1} for a language model with {n} layers, got {self.layers}")
        floor = self.layers[0] / n
        if self.counting == "inclusive" and self.retention_ratio < floor:
            raise ValueError(
                f"retention_ratio {self.retention_ratio} is below what layers={self.layers} can reach on a {n}-layer "
                f"language model with counting='inclusive': layers before {self.layers[0]} see every visual token, "
                f"so the layer average is at least {self.layers[0]}/{n} = {floor:.4f}; raise retention_ratio, prune "
                "from an earlier layer or use counting='v15'"
            )

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        """Pruning shortens the input of the layer after each of ``layers``."""
        return tuple(layer + 1 for layer in self.layers)

    # -- schedule ------------------------------------------------------------------------------

    def layer_weights(self, num_layers: int) -> tuple[int, ...]:
        """Layers counted at full length and in each stage, as v1.5's print counts them: (l0, l1-l0, l2-l1, n-l2)."""
        bounds = (*self.layers, num_layers)
        return (self.layers[0], *(b - a for a, b in zip(bounds, bounds[1:])))

    def layer_average(self, counts: tuple[int, ...], n_visual: int, num_layers: int) -> float:
        """Share of ``n_visual`` present on average over the layers with these stage sizes."""
        w = self.layer_weights(num_layers)
        return (w[0] * n_visual + sum(wi * c for wi, c in zip(w[1:], counts))) / (num_layers * n_visual)

    def kept_fractions(self) -> tuple[float, ...]:
        """ "v15": original tokens kept per stage as a share of the visual tokens, interpolated in R = N / 576."""
        anchors = [(0.0, (0.0, 0.0, 0.0)), (1.0, (1.0, 1.0, 1.0))]
        anchors += [(n / RELEASED_TOKENS, tuple(k / RELEASED_TOKENS for k in keep)) for n, keep in RELEASED.items()]
        return _interpolate(self.retention_ratio, sorted(anchors))

    def stage_fractions(self, num_layers: int) -> tuple[float, ...]:
        """ "inclusive": stage sizes as a share of the visual tokens, interpolated so the layer average is R."""
        w = self.layer_weights(num_layers)
        avg = lambda f: (w[0] + sum(wi * fi for wi, fi in zip(w[1:], f))) / num_layers  # noqa: E731
        shapes = [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]
        shapes += [tuple(k / RELEASED_TOKENS for k in keep) for keep in RELEASED.values()]
        return _interpolate(self.retention_ratio, sorted((avg(f), f) for f in shapes))

    def stage_sizes(self, n_visual: int, num_layers: int) -> tuple[int, ...]:
        """ "inclusive": visual tokens (kept + recycled) wanted in each stage, non-increasing, >= 1."""
        counts, prev = [], n_visual
        for f in self.stage_fractions(num_layers):
            prev = min(prev, max(1, round(f * n_visual)))
            counts.append(prev)
        return tuple(counts)

    def step(self, current: int, stage: int, n_visual: int, num_layers: int) -> tuple[int, int]:
        """(kept, clusters) at ``stage`` when ``current`` of an image's ``n_visual`` tokens are present."""
        if current <= 1 or self.retention_ratio >= 1.0:
            return current, 0
        if self.counting == "inclusive":
            return self.split(current, self.stage_sizes(n_visual, num_layers)[stage])
        kept = min(max(math.floor(self.kept_fractions()[stage] * n_visual + 0.5), 1), current - 1)
        return kept, recycled(current - kept) if self.recycle else 0

    def plan(self, n_visual: int, num_layers: int) -> tuple[tuple[int, int], ...]:
        """(kept, clusters) of each stage for a row with ``n_visual`` visual tokens."""
        out, current = [], n_visual
        for stage in range(len(self.layers)):
            kept, clusters = self.step(current, stage, n_visual, num_layers)
            out.append((kept, clusters))
            current = kept + clusters
        return tuple(out)

    def stage_counts(self, n_visual: int, num_layers: int) -> tuple[int, ...]:
        """Visual tokens (kept + recycled) in each stage for a row with ``n_visual`` visual tokens."""
        return tuple(k + c for k, c in self.plan(n_visual, num_layers))

    def stage_tokens(self, n_visual: int, num_layers: int) -> tuple[int, ...]:
        """Visual tokens in each stage (the layers after each pruning layer), as ``stage_counts``."""
        return self.stage_counts(n_visual, num_layers)

    def split(self, current: int, target: int) -> tuple[int, int]:
        """(kept, clusters) with kept + clusters == target when ``current`` visual tokens are present."""
        if target >= current:
            return current, 0
        if not self.recycle or target < recycled(current):
            return target, 0
        keep = torch.arange(current, dtype=torch.float64)  # candidate kept counts 0 .. current-1
        n_del = current - keep
        clusters = (((n_del * RECYCLE_SHARE).floor() + 1) / CLUSTER_SIZE).floor() + 1
        # keep + clusters(current - keep) rises by 0 or 1 per step from clusters(current) to current: target is hit
        k = int(torch.nonzero(keep + clusters == target).max())
        return k, target - k

    # -- pruning -------------------------------------------------------------------------------

    def prune(self, ctx: PruneContext) -> Stage:
        """Keep the visual tokens the text raters attend to most; recycle part of the rest."""
        if ctx.prompt is None:
            raise ValueError("sparsevlm needs the language model's input embeddings (PruneContext.prompt)")
        embeds, mask0, vis0, pos0 = ctx.prompt
        b, length = ctx.key_mask.shape
        last = length - 1 - ctx.key_mask.flip(1).int().argmax(1)  # (B,) each row's last real token
        # raters, chosen on the prompt, found in the current sequence by position (text is never pruned)
        q_idx = []
        for r in range(b):
            raters = rater_positions(embeds[r], mask0[r], vis0[r], pos0[r])  # (Q_r,), may be empty
            text_pos = torch.where(~ctx.visual[r] & ctx.key_mask[r], ctx.positions[r], -1)  # (L,)
            q = torch.nonzero(torch.isin(text_pos, raters.to(text_pos.device))).squeeze(1)
            q_idx.append(q if q.numel() else last[r : r + 1])  # no text after the image: the last token rates
        q_max = max(q.numel() for q in q_idx)
        queries = torch.stack([torch.cat([q, q[:1].expand(q_max - q.numel())]) for q in q_idx])  # (B, Q)
        probs = ctx.probs(queries).mean(1)  # (B, Q, L): head mean
        hidden, positions, visual, sources = [], [], [], []
        for r in range(b):
            h, p, v, src = self._prune_row(ctx, r, probs[r, : q_idx[r].numel()].mean(0))
            hidden.append(h)
            positions.append(p)
            visual.append(v)
            sources.append(src)
        return Stage(hidden, positions, visual, sources)

    def _prune_row(self, ctx: PruneContext, r: int, score: torch.Tensor):
        """One row: score (L,) rater-mean attention -> (hidden (L', D), positions (L',), visual (L',), sources
        (L',): the input index of each entry, -1 for a recycled cluster token)."""
        real = ctx.key_mask[r]
        vis = torch.nonzero(ctx.visual[r] & real).squeeze(1)  # (V,) current visual tokens
        keep_n, n_clusters = self.step(vis.numel(), ctx.stage, int(ctx.n_visual_full[r]), ctx.num_layers)
        ranked = vis[torch.sort(score[vis], descending=True, stable=True).indices]  # (V,) best first
        keep = real & ~ctx.visual[r]
        keep[ranked[:keep_n]] = True
        idx = torch.nonzero(keep).squeeze(1)  # text + kept visual, in sequence order
        h, p, v, src = ctx.hidden[r, idx], ctx.positions[r, idx], ctx.visual[r, idx], idx
        if n_clusters:
            deleted = ranked[keep_n:]  # best first
            chosen = deleted[: int(deleted.numel() * RECYCLE_SHARE) + 1]
            merged = cluster_means(ctx.hidden[r, chosen].float(), n_clusters).to(h.dtype)  # (n_clusters, D)
            cut = int((idx <= vis.max()).sum())  # right after the last (kept) visual token
            last_pos = ctx.positions[r, vis].max()  # the image's last visual position
            h = torch.cat([h[:cut], merged, h[cut:]])
            p = torch.cat([p[:cut], last_pos.expand(n_clusters), p[cut:]])
            v = torch.cat([v[:cut], v.new_ones(n_clusters), v[cut:]])
            src = torch.cat([src[:cut], src.new_full((n_clusters,), -1), src[cut:]])
        return h, p, v, src


def rater_positions(
    embeds: torch.Tensor, key_mask: torch.Tensor, visual: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Positions (Q,) of the text tokens after the (last) image whose relevance to the image is above average.

    embeds: (L0, D) LLM input of one row; key_mask, visual: (L0,) bool; positions: (L0,) long.
    relevance m = softmax over the text of (V T^T), averaged over the visual tokens V. Empty when
    the row has no image or no text after it; the last text token when none is above the mean.
    """
    vis = torch.nonzero(visual & key_mask).squeeze(1)  # (V,)
    text = torch.nonzero(~visual & key_mask).squeeze(1)
    if vis.numel():
        text = text[text > vis.max()]  # (T,) the text after the (last) image
    if vis.numel() == 0 or text.numel() == 0:
        return positions[:0]
    v, t = embeds[vis].float(), embeds[text].float()  # (V, D), (T, D)
    m = (v @ t.T).softmax(dim=1).mean(0)  # (T,)
    return positions[text[m > m.mean()]] if bool((m > m.mean()).any()) else positions[text[-1:]]


def cluster_means(x: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """DPC-kNN clustering of (n, C) tokens into ``n_clusters`` groups; returns the (n_clusters, C) merged tokens.

    distance = L2 / sqrt(C); density = exp(-mean squared distance to the k = n_clusters nearest, self
    included); delta = distance to the nearest denser token (the largest distance for the densest);
    centres = top n_clusters by density * delta; each token joins its nearest centre; a cluster's
    token is its members' sum / (members + 1e-6), as v1.5 weighs them. Equal densities: the earlier
    token counts as denser.
    """
    n, c = x.shape
    n_clusters = min(n_clusters, n)
    wide = torch.float32 if x.device.type == "mps" else torch.float64  # float64: the matmul form stays exact
    dist = (torch.cdist(x.to(wide)[None], x.to(wide)[None])[0] / math.sqrt(c)).to(x.dtype)  # (n, n)
    near = dist.topk(n_clusters, dim=-1, largest=False).values  # (n, k)
    density = (-(near**2).mean(-1)).exp()  # (n,)
    idx = torch.arange(n, device=x.device)
    # denser[i, j]: token j is denser than token i (ties: the earlier one)
    denser = (density[None, :] > density[:, None]) | (
        (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None])
    )
    delta = torch.where(denser, dist, dist.max()).amin(-1)  # (n,)
    score = density * delta
    centres = torch.sort(score, descending=True, stable=True).indices[:n_clusters]  # (k,)
    assign = dist[:, centres].argmin(-1)  # (n,)
    assign[centres] = torch.arange(n_clusters, device=x.device)  # a centre joins its own cluster
    sums = torch.zeros(n_clusters, c, dtype=x.dtype, device=x.device).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=n_clusters).to(x.dtype)  # >= 1: every centre is a member
    return sums / (counts[:, None] + MERGE_EPS)
