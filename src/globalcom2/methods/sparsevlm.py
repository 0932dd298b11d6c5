"""SparseVLM: text-guided progressive pruning inside the language model, with token recycling.

Follows SparseVLM's released code (github Gumpest/SparseVLMs, tag v1.5, the version the GlobalCom²
paper compared against):

* **Raters.** Once per prompt, from the LLM's input embeddings: with V the visual tokens and T the
  text after the image (question and template, to the end of the prompt),
  ``m = softmax_T(V T^T).mean_V``; the text tokens with ``m > mean(m)`` rate the visual tokens.
* **Progressive pruning.** Each layer ``l`` of ``layers`` (default 2, 6, 15, as v1.5) runs in full;
  its head-mean attention from the raters to the visual tokens, averaged over the raters, ranks
  the visual tokens, and only the top ones pass to layer ``l + 1`` (the framework prunes the input
  of ``l + 1`` with layer ``l``'s attention).
* **Recycling.** Of the deleted visual tokens (layer ``l``'s outputs), the top ``int(0.3 n_del) + 1``
  by score are clustered with DPC-kNN into ``int(n / 10) + 1`` clusters; each cluster's mean becomes
  a new visual token, placed after the kept ones (before the text). Later stages rank and prune
  those like any other visual token.

Schedule. ``retention_ratio`` R is what the paper's tables mean by a SparseVLM ratio: the share of
the visual tokens present *on average over the decoder layers*. For an image of V visual tokens,
an n-layer LLM and ``layers = (l0, l1, l2)``, with stage sizes c1 >= c2 >= c3 (kept + recycled)::

    average = (l0 V + (l1 - l0) c1 + (l2 - l1) c2 + (n - l2) c3) / n

i.e. layers before ``l0`` count as full and each pruning layer counts with the stage it produces.
This is the reading under which the released schedules average to their labels once their
recycled tokens are counted: v1.5 keeps (300, 200, 110), (303, 110, 36), (66, 30, 17) of 576
tokens for "192", "128", "64"; as they run, with clusters, the stages hold (309, 204, 113),
(312, 117, 39), (82, 32, 18), averaging 192.03, 128.6, 64.8 on 32 layers. (The code comment
"2*576 4*300 10*200 16*110" uses weights 2/4/10/16, which fit no single rule for layers 2/6/15 and
leaves the recycled tokens out; it gives 191, 126, 62.)

Stage fractions f = c / V interpolate linearly in the average between the anchors, sorted by their
average: nothing after ``l0`` (average l0/n), the three released schedules as run (fractions of
576) and keep-all (average 1). The average is linear in f, so the interpolated fractions hit R
exactly; counts are ``floor(f V + 1/2)`` for stages 1-2, and stage 3 is then chosen to bring the
average as close to R as an integer allows (clamped to [1, c2]). On the released setting (V = 576,
32 layers, layers 2/6/15), R = 192/576 gives (309, 204, 113): kept 300/200/110 plus 9/4/3 clusters,
token for token the released "192" schedule. Each stage size ``c`` is split into kept ``k`` and
clusters: the largest k with ``k + clusters(current - k) == c``. R below l0/n is unreachable and
refused by ``check_model``. Counts do not depend on ``recycle`` (without it every stage token is a
kept token). As in v1.5, each pruning layer itself runs on its full input, so the average the
decoder layers physically see is higher: weights (l0 + 1, l1 - l0, l2 - l1, n - 1 - l2), e.g.
0.278 for R = 0.25 on 2880 tokens and 32 layers; ``layer_average`` is the counted one.

Departures, each for a reason:

* Batches: the released code assumes batch size 1; each row is pruned on its own here.
* Positions: v1.5 renumbers positions contiguously after each pruning. Here kept tokens keep their
  rotary positions (like FastV) and recycled tokens take the position of the image's last visual
  token (just before the text, where v1.5 places them), so decoding positions stay the ones
  ``transformers`` assigns and a sample decodes the same alone or in a batch.
* Ties: the clustering's random density tie-break (``1e-6 rand``) is an exact deterministic one
  (equal densities: the earlier, higher-scored token counts as denser); rankings break score ties
  by sequence order. Scores, raters and clustering run in float32 (distances in float64).
* Prompts with several images: raters are the text after the last image; all visual tokens of
  the row compete in one ranking and the recycled tokens go after the last visual token.
* A stage size too small to hold even the clusters (``c < clusters(current)``) keeps the top c
  tokens without recycling; a stage size >= the current count leaves the row as it is (v1.5 would
  swap one token for a one-member cluster of itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import MethodConfig, PruneContext, Stage

#: v1.5's released schedules (576 visual tokens, pruning after layers 2/6/15): label -> tokens kept per stage
RELEASED = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
RELEASED_TOKENS = 576
RECYCLE_SHARE = 0.3  # share of the deleted tokens that are clustered
CLUSTER_SIZE = 10  # about one cluster per this many clustered tokens


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


@dataclass(frozen=True)
class SparseVLMConfig(MethodConfig):
    """SparseVLM options.

    retention_ratio: R in (0, 1], share of visual tokens kept on average over the decoder layers.
    layers: the three decoder layers whose attention prunes their output (strictly increasing).
    recycle: merge part of the deleted tokens back as cluster means (SparseVLM's token recycling).
    """

    name = "sparsevlm"
    description = "SparseVLM: text-guided progressive pruning inside the LLM with token recycling"
    where = "llm"
    paper = "SparseVLM [19] (Zhang et al., ICML 2025)"

    layers: tuple[int, ...] = (2, 6, 15)
    recycle: bool = True

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

    def check_model(self, model) -> None:
        """Every pruning layer must be followed by another layer, and R must be reachable."""
        n = model.config.text_config.num_hidden_layers
        if self.layers[-1] >= n - 1:
            raise ValueError(f"layers must all be < {n - 1} for a language model with {n} layers, got {self.layers}")
        floor = self.layers[0] / n
        if self.retention_ratio < floor:
            raise ValueError(
                f"retention_ratio {self.retention_ratio} is below what layers={self.layers} can reach on a {n}-layer "
                f"language model: layers before {self.layers[0]} see every visual token, so the layer average is at "
                f"least {self.layers[0]}/{n} = {floor:.4f}; raise retention_ratio or prune from an earlier layer"
            )

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        """Pruning shortens the input of the layer after each of ``layers``."""
        return tuple(layer + 1 for layer in self.layers)

    # -- schedule ------------------------------------------------------------------------------

    def layer_weights(self, num_layers: int) -> tuple[int, ...]:
        """Layers counted at full length and in each stage: (l0, l1 - l0, l2 - l1, n - l2)."""
        bounds = (*self.layers, num_layers)
        return (self.layers[0], *(b - a for a, b in zip(bounds, bounds[1:])))

    def layer_average(self, counts: tuple[int, ...], n_visual: int, num_layers: int) -> float:
        """Share of ``n_visual`` present on average over the layers with these stage sizes."""
        w = self.layer_weights(num_layers)
        return (w[0] * n_visual + sum(wi * c for wi, c in zip(w[1:], counts))) / (num_layers * n_visual)

    def stage_fractions(self, num_layers: int) -> tuple[float, ...]:
        """Share of the visual tokens present in each stage, interpolated so the layer average is R."""
        w = self.layer_weights(num_layers)
        avg = lambda f: (w[0] + sum(wi * fi for wi, fi in zip(w[1:], f))) / num_layers  # noqa: E731
        shapes = [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0)]
        shapes += [tuple(c / RELEASED_TOKENS for c in released_totals(k)) for k in RELEASED.values()]
        anchors = sorted((avg(f), f) for f in shapes)
        r = min(max(self.retention_ratio, anchors[0][0]), 1.0)
        for (r0, f0), (r1, f1) in zip(anchors, anchors[1:]):
            if r0 <= r <= r1:
                t = 0.0 if r1 == r0 else (r - r0) / (r1 - r0)
                return tuple(a + t * (b - a) for a, b in zip(f0, f1))
        return (1.0, 1.0, 1.0)  # pragma: no cover - r is within [anchors[0], 1]

    def stage_counts(self, n_visual: int, num_layers: int) -> tuple[int, ...]:
        """Visual tokens (kept + recycled) in each stage for an image with ``n_visual`` tokens."""
        if n_visual <= 0:
            return (0, 0, 0)
        f = self.stage_fractions(num_layers)
        counts, prev = [], n_visual
        for fi in f[:-1]:
            prev = min(max(math.floor(fi * n_visual + 0.5), 1), prev)
            counts.append(prev)
        w = self.layer_weights(num_layers)
        rest = (
            self.retention_ratio * num_layers * n_visual - w[0] * n_visual - sum(a * b for a, b in zip(w[1:], counts))
        )
        counts.append(min(max(math.floor(rest / w[-1] + 0.5), 1), prev))  # last stage: closest integer average
        return tuple(counts)

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
        b = ctx.hidden.shape[0]
        # raters, chosen on the prompt, found in the current sequence by position (text is never pruned)
        q_idx = []
        for r in range(b):
            raters = rater_positions(embeds[r], mask0[r], vis0[r], pos0[r])  # (Q_r,)
            text_pos = torch.where(~ctx.visual[r] & ctx.key_mask[r], ctx.positions[r], -1)  # (L,)
            q_idx.append(torch.nonzero(torch.isin(text_pos, raters.to(text_pos.device))).squeeze(1))
        q_max = max(q.numel() for q in q_idx)
        queries = torch.stack([torch.cat([q, q[:1].expand(q_max - q.numel())]) for q in q_idx])  # (B, Q)
        probs = ctx.probs(queries).mean(1)  # (B, Q, L): head mean
        hidden, positions, visual = [], [], []
        for r in range(b):
            h, p, v = self._prune_row(ctx, r, probs[r, : q_idx[r].numel()].mean(0))
            hidden.append(h)
            positions.append(p)
            visual.append(v)
        return Stage(hidden, positions, visual)

    def _prune_row(self, ctx: PruneContext, r: int, score: torch.Tensor):
        """One row: score (L,) rater-mean attention -> (hidden (L', D), positions (L',), visual (L',))."""
        real = ctx.key_mask[r]
        vis = torch.nonzero(ctx.visual[r] & real).squeeze(1)  # (V,) current visual tokens
        target = self.stage_counts(int(ctx.n_visual_full[r]), ctx.num_layers)[ctx.stage]
        keep_n, n_clusters = self.split(vis.numel(), target)
        ranked = vis[torch.sort(score[vis], descending=True, stable=True).indices]  # (V,) best first
        keep = real & ~ctx.visual[r]
        keep[ranked[:keep_n]] = True
        idx = torch.nonzero(keep).squeeze(1)  # text + kept visual, in sequence order
        h, p, v = ctx.hidden[r, idx], ctx.positions[r, idx], ctx.visual[r, idx]
        if n_clusters:
            deleted = ranked[keep_n:]  # best first
            chosen = deleted[: int(deleted.numel() * RECYCLE_SHARE) + 1]
            merged = cluster_means(ctx.hidden[r, chosen].float(), n_clusters).to(h.dtype)  # (n_clusters, D)
            cut = int((idx <= vis.max()).sum())  # right after the last (kept) visual token
            last_pos = ctx.positions[r, vis].max()  # the image's last visual position
            h = torch.cat([h[:cut], merged, h[cut:]])
            p = torch.cat([p[:cut], last_pos.expand(n_clusters), p[cut:]])
            v = torch.cat([v[:cut], v.new_ones(n_clusters), v[cut:]])
        return h, p, v


def rater_positions(
    embeds: torch.Tensor, key_mask: torch.Tensor, visual: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """Positions (Q,) of the text tokens after the image whose relevance to the image is above average.

    embeds: (L0, D) LLM input of one row; key_mask, visual: (L0,) bool; positions: (L0,) long.
    relevance m = softmax over the text of (V T^T), averaged over the visual tokens V. Falls back
    to the last token when the row has no image or no text after it (and to the last text token
    when no text token is above the mean).
    """
    vis = torch.nonzero(visual & key_mask).squeeze(1)  # (V,)
    text = torch.nonzero(~visual & key_mask).squeeze(1)
    if vis.numel():
        text = text[text > vis.max()]  # (T,) the text after the (last) image
    if vis.numel() == 0 or text.numel() == 0:
        return positions[key_mask][-1:]
    v, t = embeds[vis].float(), embeds[text].float()  # (V, D), (T, D)
    m = (v @ t.T).softmax(dim=1).mean(0)  # (T,)
    return positions[text[m > m.mean()]] if bool((m > m.mean()).any()) else positions[text[-1:]]


def cluster_means(x: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """DPC-kNN clustering of (n, C) tokens into ``n_clusters`` groups; returns the (n_clusters, C) means.

    distance = L2 / sqrt(C); density = exp(-mean squared distance to the k = n_clusters nearest, self
    included); delta = distance to the nearest denser token (the largest distance for the densest);
    centres = top n_clusters by density * delta; each token joins its nearest centre; a cluster is
    the uniform mean of its members. Equal densities: the earlier token counts as denser.
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
    return sums / counts[:, None]
