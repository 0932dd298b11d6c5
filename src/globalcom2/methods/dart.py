"""DART (embedding-level form): keep pivot tokens and the tokens least duplicated by them.

DART's authors (github ZichenWen1/DART; read here from its public mirror xqy1111111/DART,
``llava/model/language_model/modeling_llama_self.py`` ``get_retained_image_token``) prune inside
the language model at layer K = 2: pivots are the 4 image tokens and 4 text tokens (after the
image) with the largest L1 norm of their layer-2 keys; for each pivot in turn, the ``TOPK``
remaining image tokens *least* cosine-similar to it (layer-2 hidden states after the final norm)
are kept and leave the candidate pool; the image pivots and those tokens survive, in sequence
order. On LLaVA-NeXT the candidates are the whole stock visual sequence (thumbnail, unpadded
crops, newline tokens) and ``TOPK = min(retain, L - 4) // 8`` for ``retain`` kept tokens.

This module is the embedding-level form, for engines that cannot see layer-2 keys: the same
algorithm on the language model's *input*, before it runs:

* candidates: the image's stock visual tokens (projected features + newlines, stock order);
* image pivots: the ``pivot_image_tokens`` candidates with the largest L1 norm of their input
  embedding (instead of their layer-2 key); text pivots: the ``pivot_text_tokens`` prompt text
  tokens with the largest L1 norm of their input embedding (every attended non-image token of
  the row, not only those after the image);
* duplication: ``1 - cos`` between input embeddings (instead of normed layer-2 hidden states);
* ``retain = round(R T)`` of the T stock tokens, ``TOPK = min(retain, T - P_img) // P`` with P
  pivots, so ``P_img + P TOPK`` tokens reach the language model (their count formula: between
  ``retain - P + P_img + 1`` and ``retain + P_img``, e.g. 324 for their 320);
* pivots are visited image pivots first (largest norm first), then text pivots; their code
  visits them in the iteration order of a Python ``set`` of absolute sequence positions, an
  accident of the implementation that depends on the prompt's length;
* without a prompt (``compress`` called without ``input_ids``) only the image pivots are used.

The in-LLM form (layer-2 keys, kept tokens keep their positions) belongs with the in-LLM pruning
hooks (``models/llm_pruning.py``) and is not provided here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import core
from .base import ImageContext, MethodConfig, Selection, check_choice, selection_from_order, stock_sequence


def duplication_aware_keep(
    tokens: torch.Tensor, text: torch.Tensor | None, retain: int, n_image_pivots: int, n_text_pivots: int
) -> torch.Tensor:
    """(K,) long ascending indices of the DART-kept rows of tokens: (T, D); text: (M, D) or None.

    One vectorised step per pivot (at most ``n_image_pivots + n_text_pivots``), none per token.
    """
    t = tokens.shape[0]
    x = tokens.float()
    p_img = min(n_image_pivots, t)
    img_piv = x.abs().sum(-1).topk(p_img).indices  # (P_img,) by L1 norm
    txt = None if text is None or text.shape[0] == 0 else text.float().to(x.device)
    p_txt = 0 if txt is None else min(n_text_pivots, txt.shape[0])
    pivots = [x[img_piv]]
    if p_txt:
        pivots.append(txt[txt.abs().sum(-1).topk(p_txt).indices])
    pivots = torch.cat(pivots)  # (P, D)
    n_piv = pivots.shape[0]
    topk = min(retain, t - p_img) // max(n_piv, 1)
    normed = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)  # (T, D)
    pnormed = pivots / pivots.norm(dim=-1, keepdim=True).clamp(min=1e-8)  # (P, D)
    dissim = -(pnormed @ normed.t())  # (P, T) higher = less duplicated
    free = torch.ones(t, dtype=torch.bool, device=x.device)
    free[img_piv] = False
    kept = free.clone().fill_(False)
    kept[img_piv] = True
    if topk > 0:
        for p in range(n_piv):  # pivots in turn: each takes the TOPK free tokens least like it
            score = dissim[p].masked_fill(~free, -float("inf"))  # (T,)
            pick = torch.sort(score, descending=True, stable=True).indices[:topk]  # ties: earlier token first
            kept[pick] = True
            free[pick] = False
    return kept.nonzero().squeeze(1)


@dataclass(frozen=True)
class DARTConfig(MethodConfig):
    """DART (embedding-level) options.

    retention_ratio: R in (0, 1]; about ``round(R T)`` of the T stock visual tokens are kept (see above).
    pivot_image_tokens, pivot_text_tokens: pivots of each kind (DART's 4 and 4).
    budget: "authors" or "exact"; accepted for symmetry with GlobalCom², changes nothing: the count
        depends on the image size only, given a prompt of at least ``pivot_text_tokens`` text tokens.
    """

    name = "dart"
    description = "DART (embedding level): pivot tokens + the tokens least duplicated by them, before the LLM"
    paper = "DART (Wen et al., 2025)"
    needs = frozenset({"features", "text"})

    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4
    budget: str = "authors"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("budget", self.budget, ("authors", "exact"))
        for name in ("pivot_image_tokens", "pivot_text_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= 0, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.pivot_image_tokens == 0:
            raise ValueError("pivot_image_tokens must be >= 1 (image pivots are always kept), got 0")

    @property
    def layout_name(self) -> str:
        """Stock LLaVA-NeXT's layout (unpadding rule of ``transformers``)."""
        return "spatial"

    def fixed_count(self, ctx: ImageContext) -> int:
        """Visual tokens of any image of this geometry: P_img + P TOPK (a prompt of >= pivot_text_tokens tokens)."""
        thumb = torch.arange(ctx.scores.shape[1])
        t = core.assemble_order(thumb, ctx.valid, ctx.valid, ctx.grid, ctx.side, "spatial", ctx.box).numel()
        p_img = min(self.pivot_image_tokens, t)
        topk = min(int(round(self.retention_ratio * t)), t - p_img) // (p_img + self.pivot_text_tokens)
        return p_img + (p_img + self.pivot_text_tokens) * topk

    def select(self, ctx: ImageContext) -> Selection:
        """Pivots and their least-duplicated tokens over the image's stock sequence, in stock order."""
        stock, source = stock_sequence(ctx, "dart")  # (T,), (V N + 1, D)
        with torch.no_grad():
            retain = int(round(self.retention_ratio * stock.numel()))
            keep = duplication_aware_keep(
                source[stock], ctx.text, retain, self.pivot_image_tokens, self.pivot_text_tokens
            )
        return selection_from_order(stock[keep], ctx)
