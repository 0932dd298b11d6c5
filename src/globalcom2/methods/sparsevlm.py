"""SparseVLM: text-guided progressive pruning inside the language model, with token recycling.

Follows SparseVLM's released code (github Gumpest/SparseVLMs, the v1.0/v1.5 code the GlobalCom²
paper compared against):

* **Raters.** Once per prompt, from the LLM's input embeddings: the text after the image is
  scored by ``softmax_text(V T^T)`` averaged over the visual tokens V; text tokens scoring above
  the mean rate the visual tokens.
* **Progressive pruning.** After each layer of ``layers`` (default 2, 6, 15, as v1.5), the visual
  tokens are ranked by that layer's attention from the raters (head mean, rater mean), and the
  top ones stay for the following layers.
* **Recycling.** Of the deleted visual tokens, the top ``int(0.3 n_del) + 1`` by score are
  clustered (DPC-kNN, ``int(n/10) + 1`` clusters) and each cluster's mean is kept as a new token.

``retention_ratio`` R is what the paper's tables mean by a SparseVLM ratio: the share of the
visual tokens kept *on average over the decoder layers*, counted as SparseVLM's schedule comment
counts it (layers before the first pruning layer see everything, pruning layer ``l_i`` and the
ones up to ``l_{i+1}`` see stage i). The per-stage counts interpolate linearly in R between the
released schedules (for 576 tokens: 64 -> 66/30/17, 128 -> 303/110/36, 192 -> 300/200/110, as
fractions of the visual tokens) and the end points R = 1 (keep all) and the smallest average
possible (nothing after the first stage); since the layer average is linear in the stage
fractions, this hits R exactly up to integer rounding. Counts include the recycled tokens. As in
the released code, pruning layer ``l_i`` itself still runs on its full input (its output is
pruned), so the physical per-layer average is a little above the counted one.

Departures, each for a reason: the released code assumes batch size 1 and renumbers positions;
here every row is pruned on its own and kept tokens keep their rotary positions (recycled tokens
take the last visual position), so batched ``generate`` works and decoding positions stay those
``transformers`` assigns. The clustering's random tie-break (``1e-6 * rand``) is replaced by a
deterministic one, so a sample gives the same tokens alone and in a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import MethodConfig, PruneContext, Stage

#: released schedules (v1.5, 576 visual tokens, pruning after layers 2/6/15): kept per stage
RELEASED = ((66, 30, 17), (303, 110, 36), (300, 200, 110))
RELEASED_TOKENS = 576


@dataclass(frozen=True)
class SparseVLMConfig(MethodConfig):
    """SparseVLM options.

    retention_ratio: R in (0, 1], average share of visual tokens kept over the decoder layers.
    layers: decoder layers after which visual tokens are pruned (strictly increasing, three of them).
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
        """Every pruning layer must be followed by another layer."""
        n = model.config.text_config.num_hidden_layers
        if self.layers[-1] >= n - 1:
            raise ValueError(f"layers must all be < {n - 1} for a language model with {n} layers, got {self.layers}")

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        """Pruning shortens the input of the layer after each of ``layers``."""
        return tuple(layer + 1 for layer in self.layers)

    # -- schedule ------------------------------------------------------------------------------

    def _weights(self, num_layers: int) -> tuple[float, list[float]]:
        """Share of layers at full length and per stage, as SparseVLM's schedule comment counts them."""
        bounds = [*self.layers, num_layers]
        return self.layers[0] / num_layers, [(b - a) / num_layers for a, b in zip(bounds, bounds[1:])]

    def stage_fractions(self, num_layers: int) -> tuple[float, ...]:
        """Share of the visual tokens present in each stage, chosen so the layer average is R."""
        full, w = self._weights(num_layers)
        avg = lambda f: full + sum(wi * fi for wi, fi in zip(w, f))
        anchors = [(full, (0.0, 0.0, 0.0))]
        anchors += [(avg(f), f) for f in (tuple(c / RELEASED_TOKENS for c in s) for s in RELEASED)]
        anchors += [(1.0, (1.0, 1.0, 1.0))]
        anchors = sorted(anchors)
        r = max(self.retention_ratio, full)
        for (r0, f0), (r1, f1) in zip(anchors, anchors[1:]):
            if r0 <= r <= r1:
                t = 0.0 if r1 == r0 else (r - r0) / (r1 - r0)
                return tuple(a + t * (b - a) for a, b in zip(f0, f1))
        return (1.0, 1.0, 1.0)  # pragma: no cover - r is within [full, 1]

    def stage_counts(self, n_visual: int, num_layers: int) -> tuple[int, ...]:
        """Visual tokens (kept + recycled) in each stage for an image with ``n_visual`` tokens."""
        counts, prev = [], n_visual
        for f in self.stage_fractions(num_layers):
            c = min(prev, max(1, round(f * n_visual)) if n_visual else 0)
            counts.append(c)
            prev = c
        return tuple(counts)

    @staticmethod
    def recycled(n_deleted: int) -> int:
        """Cluster tokens made from ``n_deleted`` deleted tokens: int(int(0.3 n) + 1) / 10) + 1."""
        return int((int(n_deleted * 0.3) + 1) / 10) + 1 if n_deleted > 0 else 0

    def split(self, current: int, target: int) -> tuple[int, int]:
        """(kept, recycled) so that kept + recycled == target when ``current`` tokens are present."""
        if target >= current or not self.recycle:
            return min(target, current), 0
        keep = target
        for _ in range(8):  # fixed point: clusters depend on how many are deleted
            clusters = self.recycled(current - keep)
            keep = max(target - clusters, 0)
        clusters = min(self.recycled(current - keep), target - keep)
        return keep, clusters

    # -- pruning -------------------------------------------------------------------------------

    def prune(self, ctx: PruneContext) -> Stage:
        """Keep the visual tokens the text raters attend to most; recycle part of the rest."""
        embeds, mask0, vis0, pos0 = ctx.prompt
        b = ctx.hidden.shape[0]
        raters = [rater_positions(embeds[r], mask0[r], vis0[r], pos0[r]) for r in range(b)]
        # the raters' indices in the current sequence (text is never pruned; found by position)
        q_idx = []
        for r in range(b):
            text_pos = torch.where(~ctx.visual[r] & ctx.key_mask[r], ctx.positions[r], -1)
            q_idx.append(torch.nonzero(torch.isin(text_pos, raters[r])).squeeze(1))
        q_max = max(q.numel() for q in q_idx)
        queries = torch.stack([torch.cat([q, q[:1].expand(q_max - q.numel())]) for q in q_idx])  # (B, Q)
        probs = ctx.probs(queries).mean(1)  # (B, Q, L), head mean
        hidden, positions, visual = [], [], []
        for r in range(b):
            score = probs[r, : q_idx[r].numel()].mean(0)  # (L,), mean over this row's raters
            vis = torch.nonzero(ctx.visual[r] & ctx.key_mask[r]).squeeze(1)
            target = self.stage_counts(int(ctx.n_visual_full[r]), ctx.num_layers)[ctx.stage]
            keep_n, n_rec = self.split(vis.numel(), target)
            ranked = vis[torch.sort(score[vis], descending=True, stable=True).indices]
            keep = ctx.key_mask[r] & ~ctx.visual[r]
            keep[ranked[:keep_n]] = True
            idx = torch.nonzero(keep).squeeze(1)  # text + kept visual, in order
            h, p, v = ctx.hidden[r, idx], ctx.positions[r, idx], ctx.visual[r, idx]
            if n_rec:  # recycled cluster tokens go right after the last visual token
                deleted = ranked[keep_n:]
                chosen = deleted[: int(deleted.numel() * 0.3) + 1]
                merged = cluster_means(ctx.hidden[r, chosen].float(), n_rec).to(h.dtype)
                cut = int((idx <= vis.max()).sum())
                h = torch.cat([h[:cut], merged, h[cut:]])
                p = torch.cat([p[:cut], ctx.positions[r, vis].max().expand(merged.shape[0]), p[cut:]])
                v = torch.cat([v[:cut], v.new_ones(merged.shape[0]), v[cut:]])
            hidden.append(h)
            positions.append(p)
            visual.append(v)
        return Stage(hidden, positions, visual)


def rater_positions(embeds: torch.Tensor, key_mask: torch.Tensor, visual: torch.Tensor, positions: torch.Tensor):
    """Positions of the text tokens after the image whose relevance to the image is above average.

    embeds: (L0, D) LLM input of one row; key_mask, visual: (L0,) bool; positions: (L0,) long.
    relevance = softmax over text of (V T^T), averaged over the visual tokens V.
    """
    vis = torch.nonzero(visual & key_mask).squeeze(1)
    if vis.numel() == 0:
        return positions[key_mask][-1:]
    text = torch.nonzero(~visual & key_mask).squeeze(1)
    text = text[text > vis.max()]
    if text.numel() == 0:
        return positions[key_mask][-1:]
    v, t = embeds[vis].float(), embeds[text].float()  # (V, D), (T, D)
    m = (v @ t.T).softmax(dim=1).mean(0)  # (T,)
    chosen = text[m > m.mean()]
    return positions[chosen if chosen.numel() else text[-1:]]


def cluster_means(x: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """DPC-kNN clustering of (n, C) tokens into ``n_clusters`` groups; returns (n_clusters, C) means.

    distance = L2 / sqrt(C); density = exp(-mean squared distance to the k = n_clusters nearest
    (self included)); delta = distance to the nearest denser token (the largest distance for the
    densest); centres = top n_clusters by density * delta; each token joins its nearest centre.
    """
    n, c = x.shape
    n_clusters = min(n_clusters, n)
    dist = torch.cdist(x[None], x[None])[0] / math.sqrt(c)  # (n, n)
    k = min(n_clusters, n)
    near = dist.topk(k, dim=-1, largest=False).values
    density = (-(near**2).mean(-1)).exp()
    density = density + torch.arange(n, 0, -1, device=x.device, dtype=x.dtype) * 1e-6 / n  # deterministic ties
    denser = density[None, :] > density[:, None]  # (n, n): j denser than i
    delta = torch.where(denser, dist, torch.full_like(dist, float("inf"))).amin(-1)
    delta = torch.where(torch.isinf(delta), dist.max(), delta)
    centres = (density * delta).topk(n_clusters).indices  # (k,)
    assign = dist[:, centres].argmin(-1)  # (n,)
    assign[centres] = torch.arange(n_clusters, device=x.device)
    sums = torch.zeros(n_clusters, c, dtype=x.dtype, device=x.device).index_add_(0, assign, x)
    counts = torch.bincount(assign, minlength=n_clusters).clamp(min=1).to(x.dtype)
    return sums / counts[:, None]
