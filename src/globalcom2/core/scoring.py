"""How a view's tokens are rated, with or without a [CLS] token: the ``scorer`` option of every family.

Each adapter recomputes what a scorer needs from the vision tower's hidden states (the layer norm
and q/k projections of one layer), so any attention kernel works (eager, SDPA, flash) and no
``output_attentions=True`` is needed. Shapes: V views, T tokens per view as the tower sees them
(``1 + N`` with a [CLS] token, ``N`` without), D model width, H heads.

* ``"cls"``: the [CLS] row of the attention (``score="logits"``: head-averaged logits, as the
  GlobalCom² authors; ``"softmax"``: head-averaged probabilities, the paper's Eq. 1).
* ``"attention_received"``: the head-averaged attention probability each token receives, averaged
  over every query of the view (VisionZip's and VisPruner's rating for SigLIP towers).
* ``"global_dissimilarity"``: minus the cosine similarity of a token to the mean token of its view
  (tokens unlike the view's gist rate high); reported as the GlobalCom² authors' choice for
  LLaVA-OneVision.

``"auto"`` is ``"cls"`` where the tower has a [CLS] token and ``"global_dissimilarity"`` otherwise, unless
the family declares its own default (``FamilyAdapter.default_scorer``; Qwen-VL: ``"attention_received"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def cls_attention(q_cls: torch.Tensor, keys: torch.Tensor, num_heads: int, score: str = "logits") -> torch.Tensor:
    """Head-averaged attention of the [CLS] query over the patch tokens.

    q_cls: (V, D) query of the [CLS] token, already multiplied by the head scale.
    keys:  (V, 1 + N, D) keys of [CLS] + patches.
    score: "logits" -> mean over heads of the pre-softmax logits (the authors' code);
           "softmax" -> mean over heads of the attention probabilities (paper Eq. 1).
    returns: (V, N) float32, one score per patch token.
    """
    v, t, d = keys.shape
    hd = d // num_heads
    q = q_cls.float().view(v, num_heads, 1, hd)  # (V, H, 1, hd)
    k = keys.float().view(v, t, num_heads, hd).transpose(1, 2)  # (V, H, 1+N, hd)
    logits = torch.matmul(q, k.transpose(-1, -2)).squeeze(2)  # (V, H, 1+N)
    if score == "softmax":
        logits = logits.softmax(dim=-1)
    return logits.mean(dim=1)[:, 1:]  # (V, N)


SCORERS = ("cls", "attention_received", "global_dissimilarity")
#: what ``scorer=`` accepts
SCORER_CHOICES = ("auto", *SCORERS)


def resolve_scorer(scorer: str, has_cls: bool, tower: str = "this vision tower", default: str | None = None) -> str:
    """The concrete scorer for ``scorer`` ("auto" resolved); ValueError naming ``scorer`` if it cannot run.

    default: what "auto" means on this tower where its family declares it (Qwen-VL: "attention_received");
    None keeps the rule above ("cls" with a [CLS] token, else "global_dissimilarity").
    """
    if scorer not in SCORER_CHOICES:
        raise ValueError(f"scorer must be one of ({', '.join(map(repr, SCORER_CHOICES))}), got {scorer!r}")
    if scorer == "auto":
        if default is not None:
            return resolve_scorer(default, has_cls, tower)
        return "cls" if has_cls else "global_dissimilarity"
    if scorer == "cls" and not has_cls:
        raise ValueError(
            f"scorer='cls' needs a [CLS] token, which {tower} does not have; use one of "
            "('attention_received', 'global_dissimilarity') or 'auto'"
        )
    return scorer


def attention_received(q: torch.Tensor, k: torch.Tensor, num_heads: int, has_cls: bool) -> torch.Tensor:
    """(V, N) head- and query-averaged attention probability each patch token receives.

    q: (V, T, D) queries already multiplied by the head scale; k: (V, T, D) keys.
    With ``has_cls`` the [CLS] token (position 0) counts as a query but is not rated.
    One view at a time, so the (H, T, T) attention map of a single view is the largest buffer.
    """
    v, t, d = k.shape
    hd = d // num_heads
    out = []
    for i in range(v):  # loop over views, not tokens
        qi = q[i].float().view(t, num_heads, hd).transpose(0, 1)  # (H, T, hd)
        ki = k[i].float().view(t, num_heads, hd).transpose(0, 1)  # (H, T, hd)
        probs = torch.matmul(qi, ki.transpose(-1, -2)).softmax(dim=-1)  # (H, T, T)
        out.append(probs.mean(dim=(0, 1)))  # (T,)
    received = torch.stack(out)  # (V, T)
    return received[:, 1:] if has_cls else received


def global_dissimilarity(tokens: torch.Tensor) -> torch.Tensor:
    """(V, N) minus the cosine similarity of each token to the mean token of its view. tokens: (V, N, D)."""
    x = tokens.float()
    gist = x.mean(dim=1, keepdim=True)  # (V, 1, D)
    return -F.cosine_similarity(x, gist, dim=-1)  # (V, N)


def view_scores(
    scorer: str,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    tokens: torch.Tensor | None,
    num_heads: int,
    has_cls: bool,
    score: str = "logits",
) -> torch.Tensor:
    """(V, N) float32 rating of every patch token of every view by ``scorer`` (a concrete name, see ``SCORERS``).

    q, k: (V, T, D) scaled queries and keys of the scoring layer (``"cls"`` reads only q[:, 0]);
    tokens: (V, N, D') the patch tokens of the scoring layer's output, for ``"global_dissimilarity"``.
    """
    if scorer == "cls":
        return cls_attention(q[:, 0], k, num_heads, score)
    if scorer == "attention_received":
        return attention_received(q, k, num_heads, has_cls)
    if scorer == "global_dissimilarity":
        return global_dissimilarity(tokens)
    raise ValueError(f"scorer must be one of ({', '.join(map(repr, SCORERS))}), got {scorer!r}")


def f32_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin(x)`` in float32: scores are computed in float32 whatever the model's dtype."""
    bias = lin.bias.float() if lin.bias is not None else None
    return F.linear(x.float(), lin.weight.float(), bias)


def cls_scores_from_input(
    x: torch.Tensor, q_proj: nn.Linear, k_proj: nn.Linear, num_heads: int, scale: float, score: str = "logits"
) -> torch.Tensor:
    """(V, N) [CLS] attention of one attention layer, recomputed from its (normed) input x: (V, 1 + N, D).

    Only the [CLS] query is projected; q_proj/k_proj are the layer's own projections (any module with
    ``weight``/``bias``, e.g. a replicated copy in a serving engine). One function for every engine.
    """
    q_cls = f32_linear(q_proj, x[:, 0]) * scale  # (V, D)
    keys = f32_linear(k_proj, x)  # (V, 1 + N, D)
    return cls_attention(q_cls, keys, num_heads, score)


def head_mean_keys(keys: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(V, T, d_head) keys averaged over heads, from keys (V, T, D) (VisionZip's merge metric)."""
    v, t, d = keys.shape
    return keys.view(v, t, num_heads, d // num_heads).mean(dim=2)
