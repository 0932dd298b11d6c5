"""CDPruner: conditional DPP over the visual tokens, conditioned on the instruction.

Follows the code the authors ran (github Theia-4869/CDPruner, ``llava/model/llava_arch.py``
``encode_images`` and ``prepare_inputs_labels_for_multimodal``) on LLaVA-NeXT, view by view:

* similarity: cosine between the projected features of the view's N tokens (float32);
* relevance: cosine between each token and the instruction, negated and averaged over the text
  embeddings, then min-max normalised (``(r - min + 1e-6) / (max - min)``) over all views;
* kernel ``L = diag(r) S diag(r)``; every view keeps ``T = max(1, round(N R))`` tokens by the fast
  greedy MAP of the DPP (incremental Cholesky rows, one vectorised step per chosen token,
  batched over the views; no Python loop over tokens or kernel entries);
* the layout their code executes: ``prepare_inputs_labels_for_multimodal`` runs
  ``mm_patch_merge_type.replace('_unpad', '')``, so LLaVA-NeXT's ``spatial_unpad`` checkpoints take the
  plain ``spatial`` branch: no unpadding, no newline tokens, all T picks of every crop kept (letterbox
  padding included); the thumbnail's picks in raster order, then the crops' in raster order of the
  whole padded grid. ``unpad=True`` instead follows the ``spatial_unpad`` branch that line switches
  off (the library's layout before 0.2): the crop mask is unpadded like the features (their
  ``unpad_image`` truncates), picks in the padding are dropped and every unpadded row ends with the
  newline token.

Departures (each with the reason and the option):

* the instruction embedding: stock LLaVA-NeXT has no CLIP text tower, so relevance is measured in
  the language model's input space instead of CLIP's: the projected visual features against the
  LLM's own input embeddings of the prompt's text tokens (every attended non-image token of the
  image's row, chat template included; their code embeds the bare question with CLIP's text
  tower). ``text_pooling="mean"`` (default) averages those embeddings into one vector, as CLIP
  gives one embedding per text; ``"tokens"`` averages the cosines over the tokens instead.
  Without a prompt (e.g. ``compress`` called without ``input_ids``) the relevance is constant and
  the method is the plain DPP over the similarity kernel.
* min-max normalisation over the views of one image (theirs: over the whole batch of views, which
  is the same for one image per batch and keeps batch == alone); a constant relevance is 1.
* the crop grid: their ``select_best_resolution`` (``llava/mm_utils.py``) replaces the checkpoint's
  pinpoints with a single 672x672 one ("fix resolution for LLaVA to get 2880 visual tokens"), so every
  image becomes 2x2 crops there. The library runs on the stock processor's pixel values, whose crops
  are already cut to the checkpoint's own grid (1x2, 2x1, 2x2, 1x3, 3x1 for LLaVA-NeXT-7B): unavoidable
  on a stock processor; the count ``(1 + n) T`` follows its n.
* the greedy's negative gain: once the chosen token's gain falls to 1e-10 or below, the step adds no
  Cholesky row, so the remaining picks are distinct tokens by residual gain. That happens whenever the
  kernel is numerically rank-deficient, not only when the feature width D is below T: near-duplicate
  tokens (flat letterbox padding, a uniform sky) make it so at any D. Their code divides by the square
  root of a zero or negative gain there and can return repeated or NaN-driven picks.
* the stock cap: with the executed layout every view keeps T tokens of the padded grid, so for R < 1 an
  image with much letterbox padding at a high R would get more tokens than stock LLaVA-NeXT feeds its LLM
  (3x1000 px already at R = 0.5: 1152 where stock sends 576). The views' counts are then lowered to one
  common ceiling so that the total is at most stock's (``core.hold_views``); where their T per view fits
  (every image at the usual R <= 0.75 but very thin ones) it is kept exactly. R = 1 keeps every view whole.
* ``negate=True`` is their sign ``(-relevance).mean``; ``False`` ranks relevant tokens up instead.

Qwen2.5-VL / Qwen3-VL: the authors released no Qwen code (their repository has LLaVA-1.5/NeXT only; their
project page reports Qwen2.5-VL results without it). The LLaVA algorithm above runs on the merged tokens,
view by view, where the views are the family's regions of the token map (``docs/qwen.md``); there is no
letterbox padding there, so the family runs ``budget="exact"`` (the candidates are every region's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import core
from .base import ImageContext, Requirements, Selection, ViewSelector, VisionMethod, stock_length
from .checks import check_choice

POOLINGS = ("mean", "tokens")


def instruction_relevance(
    feats: torch.Tensor, text: torch.Tensor | None, pooling: str = "mean", negate: bool = True
) -> torch.Tensor:
    """(V, N) float32 min-max normalised relevance of every token to the instruction (CDPruner).

    feats: (V, N, D) projected features; text: (M, D) text embeddings, None or M = 0 -> ones.
    """
    v, n, _ = feats.shape
    if text is None or text.shape[0] == 0:
        return torch.ones(v, n, device=feats.device)
    img = feats.float()
    img = img / img.norm(dim=-1, keepdim=True)  # (V, N, D)
    txt = text.float().to(feats.device)
    if pooling == "mean":
        txt = txt.mean(dim=0, keepdim=True)  # (1, D)
    txt = txt / txt.norm(dim=-1, keepdim=True)  # (M, D)
    rel = img @ txt.t()  # (V, N, M)
    rel = (-rel if negate else rel).mean(dim=-1)  # (V, N)
    span = rel.max() - rel.min()
    if not bool(span > 0):
        return torch.ones_like(rel)
    return (rel - rel.min() + 1e-6) / span


def dpp_greedy(
    kernel: torch.Tensor, t: int, candidates: torch.Tensor | None = None, ordered: bool = False
) -> torch.Tensor:
    """Fast greedy MAP of a DPP per batch row. kernel: (B, N, N) PSD; returns (B, t) long, ascending.

    candidates: optional (B, N) bool; other tokens are never picked while a candidate is left (their
    gain starts at -inf). ordered: return the picks in the order chosen instead of ascending; the
    greedy is prefix-consistent, so the first t' of them are the greedy's picks for t'.
    """
    b, n, _ = kernel.shape
    t = max(0, min(int(t), n))
    rows = torch.arange(b, device=kernel.device)
    cis = torch.zeros(t, b, n, dtype=kernel.dtype, device=kernel.device)  # (T, B, N) Cholesky rows
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # (B, N) marginal gains
    if candidates is not None:
        di2s = di2s.masked_fill(~candidates.to(di2s.device), -float("inf"))
    chosen = torch.empty(t, b, dtype=torch.long, device=kernel.device)
    for i in range(t):  # one step per chosen token, vectorised over tokens and views
        j = di2s.argmax(dim=-1)  # (B,)
        chosen[i] = j
        proj = torch.einsum("tb,tbn->bn", cis[:i, rows, j], cis[:i])  # (B, N)
        pivot = di2s[rows, j]  # (B,) gain of the chosen token
        eis = (kernel[rows, j] - proj) / pivot.clamp(min=1e-10).sqrt().unsqueeze(-1)  # (B, N)
        eis = torch.where((pivot > 1e-10).unsqueeze(-1), eis, torch.zeros_like(eis))  # kernel exhausted: no update
        cis[i] = eis
        di2s = di2s - eis.square()
        di2s[rows, j] = -float("inf")
    return chosen.t() if ordered else chosen.t().sort(dim=1).values


@dataclass(frozen=True)
class CDPrunerConfig(VisionMethod):
    """CDPruner options.

    retention_ratio: R in (0, 1]; every view keeps ``T = max(1, round(N R))`` tokens (for R < 1 held to the
        stock count, see the module docstring).
    text_pooling: "mean" (one instruction vector, like CLIP's text embedding) or "tokens".
    negate: CDPruner's sign of the relevance (True, theirs) or the opposite.
    unpad: False (default: the branch their code executes, ``spatial``: all T picks of every view over the
        padded crop grid, no newlines) or True (the ``spatial_unpad`` branch their code switches off: picks in
        the letterbox padding dropped, a newline after every unpadded row, as the library did before 0.2).
    budget: with ``unpad=True``: "authors" (T per view over all N tokens, the picks that land in a crop's
        letterbox padding then dropped, so the count depends on the pixels) or "exact": the DPP picks among
        each view's n_v unpadded tokens only, ``max(1, round(n_v R))`` of them (``round(N R)`` for the
        thumbnail and for crops without padding, as theirs), a count set by the image size alone. With
        ``unpad=False`` both are the same: the count ``(1 + n) T`` depends on the image size only.
    """

    name = "cdpruner"
    description = "CDPruner: per view, conditional DPP (diversity x instruction relevance), greedy MAP"
    paper = "CDPruner (Zhang et al., 2025)"

    text_pooling: str = "mean"
    negate: bool = True
    unpad: bool = False
    budget: str = "authors"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("text_pooling", self.text_pooling, POOLINGS)
        check_choice("budget", self.budget, ("authors", "exact"))
        if not isinstance(self.negate, bool):
            raise TypeError(f"negate must be True or False, got {self.negate!r}")
        if not isinstance(self.unpad, bool):
            raise TypeError(f"unpad must be True or False, got {self.unpad!r}")

    @property
    def requires(self) -> Requirements:
        """Their executed layout (padded grid, no newlines) or, with ``unpad``, stock's (unpadded rows, one newline
        each; their ``unpad_image`` truncates); thumbnail in raster order; the projected features and the prompt's
        text embeddings."""
        return Requirements(
            unpad=self.unpad, unpad_rounding=None, layout="spatial" if self.unpad else "flat",
            thumbnail_order="spatial", needs=frozenset({"features", "text"}),
        )  # fmt: skip

    def kernel(self, ctx: ImageContext) -> torch.Tensor:
        """(V, N, N) float32 conditional DPP kernel ``r_i cos(x_i, x_j) r_j`` of every view."""
        if ctx.features is None:
            raise ValueError("cdpruner needs the projected features (ImageContext.features)")
        feats = ctx.features.detach()  # (V, N, D)
        x = feats / feats.norm(dim=-1, keepdim=True)
        x = x.float()
        sim = x @ x.transpose(1, 2)  # (V, N, N)
        rel = instruction_relevance(feats, ctx.text, self.text_pooling, self.negate)  # (V, N)
        return sim.mul_(rel[:, :, None]).mul_(rel[:, None, :])  # (r_i s_ij) r_j in place, no (V, N, N) copies

    def view_counts(self, ctx: ImageContext) -> torch.Tensor:
        """(V,) long tokens each view keeps when the DPP picks among the view's n_v candidates only (``unpad=False``,
        or ``budget="exact"``): max(1, round(n_v R)) of n_v; without unpadding and R < 1 held to the stock count."""
        n_valid = torch.cat([torch.tensor([ctx.scores.shape[1]]), ctx.valid.sum(1).cpu()])  # (V,)
        t = torch.round(n_valid.double() * self.retention_ratio).long().clamp(min=1)
        t = torch.minimum(t, n_valid)
        return t if self.unpad or self.retention_ratio >= 1 else core.hold_views(t, stock_length(ctx))

    def content_dependence(self) -> str | None:
        """Why the count depends on the pixels (``unpad=True, budget="authors"``: picks in the padding are dropped)."""
        if self.budget == "exact" or not self.unpad:
            return None
        return (
            "with unpad=True and budget='authors', method 'cdpruner' drops the picks that land in a crop's "
            "letterbox padding, so its token count depends on the image's content; pass budget='exact' for a "
            "count that depends on the image size only (the default unpad=False has one too)"
        )

    def size_budget(self, ctx: ImageContext) -> tuple[int, torch.Tensor]:
        """(thumbnail tokens, (n,) crop tokens) when the count depends on the size only (``view_counts``)."""
        t = self.view_counts(ctx)
        return int(t[0]), t[1:]

    def select(self, ctx: ImageContext) -> Selection:
        """T tokens per view by the conditional DPP (with ``unpad``, crop picks in the padding then dropped)."""
        v, n_tok = ctx.scores.shape
        valid = ctx.valid.to(ctx.scores.device)
        if self.budget == "exact" or not self.unpad:
            t = self.view_counts(ctx).to(valid.device)  # (V,)
            cand = torch.cat([torch.ones(1, n_tok, dtype=torch.bool, device=valid.device), valid])  # (V, N)
            with torch.no_grad():
                order = dpp_greedy(self.kernel(ctx), int(t.max()), cand.to(ctx.features.device), ordered=True)
            first = torch.arange(order.shape[1], device=order.device)[None] < t[:, None].to(order.device)  # (V, T)
            view, rank = first.nonzero(as_tuple=True)
            keep = torch.zeros(v, n_tok, dtype=torch.bool, device=order.device)
            keep[view, order[view, rank]] = True
            crop_keep = keep[1:] & valid.to(keep.device)
            thumb = keep[0].nonzero().squeeze(1)
        else:
            t = min(max(1, round(n_tok * self.retention_ratio)), n_tok)
            with torch.no_grad():
                chosen = dpp_greedy(self.kernel(ctx), t)  # (V, T)
            keep = torch.zeros(v, n_tok, dtype=torch.bool, device=chosen.device).scatter_(1, chosen, True)
            crop_keep = keep[1:] & valid.to(keep.device)
            thumb = chosen[0]
        ratios = (crop_keep.sum(1).double() / ctx.valid.sum(1).clamp(min=1).double().to(keep.device)).cpu()
        return Selection(thumb, crop_keep, ratios)


class CDPrunerSelector(ViewSelector):
    """CDPruner inside one view: greedy MAP of the conditional DPP over the view's candidates."""

    name = "cdpruner"
    method = CDPrunerConfig
    options = ("text_pooling", "negate")
    needs = frozenset({"features", "text"})

    def prepare(self, ctx: ImageContext, options: dict) -> dict:
        """The features and their relevance to the prompt, min-max normalised over the image's views."""
        feats = self.projected(ctx)  # (V, N, D)
        return {
            "features": feats,
            "relevance": instruction_relevance(feats, ctx.text, options["text_pooling"], options["negate"]),
        }  # (V, N)

    def pick(self, ctx: ImageContext, state: dict, view: int, pos: torch.Tensor, k: int, options: dict):
        """k candidates, ascending."""
        x = state["features"][view, pos].float()  # (M, D)
        x = x / x.norm(dim=-1, keepdim=True)
        rel = state["relevance"][view, pos]  # (M,)
        kernel = rel[:, None] * (x @ x.t()) * rel[None, :]  # (M, M)
        return pos[dpp_greedy(kernel[None], k)[0]], None
