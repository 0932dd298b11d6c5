"""DART: keep pivot tokens and the visual tokens least duplicated by them.

DART's authors (github ZichenWen1/DART; read here from its public mirror xqy1111111/DART,
``llava/model/language_model/modeling_llama_self.py``, class ``DART`` and its
``get_retained_image_token``; LLaVA-NeXT settings from ``llava/eval/model_vqa_loader.py`` and
``scripts/v1_6``) prune *inside* the language model. Two forms are provided, chosen by ``form``:

``form="llm"`` (default, the authors' released form), through the in-LLM hooks of
``models/llm_pruning.py`` as FastV:

* layers ``0 .. K-1`` (``k``, default K = 2 as their ``--pruned_layer 2``) see every token; the
  input of layer K is shortened;
* candidates: every visual token of the row (LLaVA-NeXT: thumbnail, unpadded crops and newlines,
  the whole stock span, as their ``image_token_length = seq_len - text_length`` makes it);
* pivots: the ``pivot_image_tokens`` (4) candidates and the ``pivot_text_tokens`` (4) tokens after
  the image (question, template, up to the end of the prompt) with the largest L1 norm of their
  keys in layer K-1 (rotary-embedded, every head: their ``layer_outputs[-2]`` of the layer before
  K), text tokens are pivots but never candidates;
* duplication: cosine similarity of the layer-K input states after the model's final norm (their
  ``self.norm(layer_outputs[0])``); for each pivot in turn the ``TOPK`` free candidates *least*
  similar to it are kept and leave the pool; ``retain = round(R V)`` of the row's V visual
  tokens (their absolute ``retain_token_num_for_llava_next``, 320 of 2880 at R = 1/9),
  ``TOPK = min(retain, V - P_img) // P`` with P pivots, so ``P_img + P TOPK`` visual tokens reach
  layer K (324 at R = 1/9);
* pivots are visited in the iteration order of a Python ``set`` of their absolute positions, as
  their ``for item in list(indices_set)`` does (rebuilt here from the same insertion order, so the
  same accident of CPython's hashing is reproduced token for token);
* kept tokens keep their rotary positions (their ``position_ids = keep_indexs``); layers ``>= K``
  cache only the kept tokens and decoding steps attend to those, as FastV here.

``form="embedding"``, for engines that cannot see layer-K keys (the vLLM plugin): the same algorithm
on the language model's *input*, per image, before it runs:

* candidates: the image's stock visual tokens (projected features + newlines, stock order);
* image pivots: the ``pivot_image_tokens`` candidates with the largest L1 norm of their input
  embedding (instead of their layer-2 key); text pivots: the ``pivot_text_tokens`` prompt text
  tokens with the largest L1 norm of their input embedding (every attended non-image token of
  the row, not only those after the image);
* duplication: ``1 - cos`` between input embeddings (instead of normed layer-2 hidden states);
* ``retain`` and ``TOPK`` as above over the image's T stock tokens;
* pivots are visited image pivots first (largest norm first), then text pivots;
* without a prompt (``compress`` called without ``input_ids``) only the image pivots are used.

Departures of the in-LLM form from the released code, each for a reason:

* Batches: their code asserts batch size 1; each row is pruned on its own here (rows re-aligned with
  left padding; positions, hence the set order, are the row's own, so a row selects the same alone).
* Precision: key norms and cosines in float32 (their fp16 norms round many keys to equal values).
* Ties: equal norms or similarities go to the earlier token (``topk`` leaves them unspecified).
* Fewer than ``pivot_text_tokens`` text tokens after the image (their ``topk`` raises): all of them
  are pivots, and ``TOPK`` divides by the pivots actually found.
* Several images in a row: all visual tokens of the row form one pool and the text pivots come
  after the last image (their code handles one image per prompt).
* Their LLaVA-1.5 branch (``max_num_trunction``: ``TOPK = ceil(M // 8)`` of 576 fixed tokens after a
  35-token system prompt) is not implemented: the LLaVA-NeXT rule above covers every image size.
* No visual token in a row: the row is passed through.

Qwen2.5-VL: their Qwen2.5-VL code (the same mirror, ``Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py``,
``get_retained_image_token``) runs the same algorithm with ``TOPK = int(V (1 - reduction_ratio) / (4 + 4))``
of the image span (first ``<|image_pad|>`` to ``<|vision_end|>``) and kept tokens at their 3-D M-RoPE
positions; ``topk_rule="qwen2_5_vl"`` is that count, and ``"auto"`` picks it on Qwen-VL (Qwen3-VL has no
author code: the same rule). Their departures from it here as above (batches, several images in one pool).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from .base import (
    ImageContext,
    LLMMethod,
    MethodConfig,
    PruneContext,
    Requirements,
    Selection,
    Stage,
    ViewSelector,
    VisionMethod,
    check_pruning_layer,
)
from .checks import check_choice
from .sequence import selection_from_order, stock_length, stock_sequence

FORMS = ("llm", "embedding")
#: DART's released pivots: 4 image tokens and 4 text tokens (their ``pivot_image_token``/``pivot_text_token``)
PIVOT_IMAGE_TOKENS, PIVOT_TEXT_TOKENS = 4, 4
#: DART's released pruning layer (``--pruned_layer 2``)
PRUNED_LAYER = 2


def least_duplicated(states: torch.Tensor, pivots: torch.Tensor, free: torch.Tensor, topk: int) -> torch.Tensor:
    """(T,) bool: the tokens each pivot in turn keeps, ``topk`` apiece, least cosine-similar to it.

    states: (T, D) candidates' states; pivots: (P, D) in visiting order; free: (T,) bool tokens still
    in the pool (a kept token leaves it). Ties go to the earlier token. One step per pivot.
    """
    x = states.float()
    normed = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)  # (T, D)
    p = pivots.float()
    pnormed = p / p.norm(dim=-1, keepdim=True).clamp(min=1e-8)  # (P, D)
    dissim = -(pnormed @ normed.t())  # (P, T) higher = less duplicated
    free = free.clone()
    kept = torch.zeros_like(free)
    if topk > 0:
        for row in dissim:  # pivots in turn: each takes the TOPK free tokens least like it
            score = row.masked_fill(~free, -float("inf"))  # (T,)
            pick = torch.sort(score, descending=True, stable=True).indices[:topk]  # ties: earlier token first
            kept[pick] = True
            free[pick] = False
    return kept


def topk_per_pivot(retain: int, n_candidates: int, n_image_pivots: int, n_pivots: int) -> int:
    """DART's TOPK: ``min(retain, candidates - image pivots) // pivots``."""
    return min(retain, n_candidates - n_image_pivots) // max(n_pivots, 1)


#: how TOPK is counted: the family's authors' rule, their LLaVA-NeXT scripts', their Qwen2.5-VL code's
TOPK_RULES = ("auto", "llava_next", "qwen2_5_vl")


def set_order(positions: list[int]) -> list[int]:
    """Indices into ``positions`` in the order a Python set built from them iterates (DART's pivot order)."""
    where = {p: i for i, p in reversed(list(enumerate(positions)))}
    return [where[p] for p in set(positions)]


def duplication_aware_keep(
    tokens: torch.Tensor, text: torch.Tensor | None, retain: int, n_image_pivots: int, n_text_pivots: int,
    topk: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """(K,) long ascending indices of the DART-kept rows of tokens: (T, D); text: (M, D) or None (embedding form).

    topk: tokens each pivot keeps; None: ``topk_per_pivot(retain, ...)`` (their LLaVA-NeXT rule).
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
    free = torch.ones(t, dtype=torch.bool, device=x.device)
    free[img_piv] = False
    if topk is None:
        topk = topk_per_pivot(retain, t, p_img, pivots.shape[0])
    kept = least_duplicated(x, pivots, free, topk)
    kept[img_piv] = True
    return kept.nonzero().squeeze(1)


@dataclass(frozen=True)
class _DARTOptions(MethodConfig):
    """DART options, shared by both forms (``make_config("dart", form=...)`` picks the form's class).

    retention_ratio: R in (0, 1]; about ``round(R V)`` of the V visual tokens are kept (see above).
    form: "llm" (the authors' form: pivots by layer K-1 key norm, pruned before layer K) or
        "embedding" (before the language model, on its input embeddings, per image).
    k: with form="llm", prune before decoder layer K (0-based) using layer K-1; 1 <= K < num layers.
    pivot_image_tokens, pivot_text_tokens: pivots of each kind (DART's 4 and 4).
    budget: "authors" or "exact", form="embedding" only; changes nothing: the count depends on the image
        size only, given a prompt of at least ``pivot_text_tokens`` text tokens.
    topk_rule: how many tokens each pivot keeps (TOPK): "llava_next" (their LLaVA-NeXT scripts:
        ``min(round(R V), V - P_img) // P`` with P the pivots found), "qwen2_5_vl" (their Qwen2.5-VL code:
        ``int(V R / (pivot_image_tokens + pivot_text_tokens))``, capped at ``(V - P_img) // P`` so the pool never
        runs dry where their ``topk`` would raise), or "auto" (default: the rule of the authors' code for the
        family, "qwen2_5_vl" on Qwen-VL, "llava_next" elsewhere).
    """

    name = "dart"
    description = "DART: pivot tokens + the tokens least duplicated by them (in the LLM, or form='embedding')"
    paper = "DART (Wen et al., 2025)"
    #: the value of ``form`` this class runs
    form_name: ClassVar[str] = ""

    form: str = "llm"
    k: int = PRUNED_LAYER
    pivot_image_tokens: int = PIVOT_IMAGE_TOKENS
    pivot_text_tokens: int = PIVOT_TEXT_TOKENS
    budget: str = "authors"
    topk_rule: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("form", self.form, FORMS)
        check_choice("topk_rule", self.topk_rule, TOPK_RULES)
        if self.form != self.form_name:
            other = "DARTEmbeddingConfig" if self.form == "embedding" else "DARTConfig"
            raise TypeError(
                f"{type(self).__name__} runs form={self.form_name!r}; for form={self.form!r} use {other} "
                f"or make_config('dart', form={self.form!r})"
            )
        if isinstance(self.k, (bool, np.bool_)) or not isinstance(self.k, numbers.Integral) or self.k < 1:
            raise ValueError(f"k must be an int >= 1 (prune before layer K using layer K-1's keys), got {self.k!r}")
        object.__setattr__(self, "k", int(self.k))
        check_choice("budget", self.budget, ("authors", "exact"))
        if self.form == "llm" and self.budget != "authors":
            raise TypeError(
                "method 'dart' prunes inside the language model, where budget does not apply (form='llm'); "
                f"budget is an option of form='embedding'; got budget={self.budget!r}"
            )
        for name in ("pivot_image_tokens", "pivot_text_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int >= 0, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.pivot_image_tokens == 0:
            raise ValueError("pivot_image_tokens must be >= 1 (image pivots are always kept), got 0")

    def topk(self, n_visual: int, n_image_pivots: int, n_pivots: int) -> int:
        """TOPK, the tokens each of ``n_pivots`` pivots keeps of ``n_visual`` candidates (``topk_rule``)."""
        room = topk_per_pivot(n_visual, n_visual, n_image_pivots, n_pivots)  # (V - P_img) // P
        if self.topk_rule == "qwen2_5_vl":
            share = n_visual * self.retention_ratio / (self.pivot_image_tokens + self.pivot_text_tokens)
            return min(int(share), room)
        return topk_per_pivot(int(round(self.retention_ratio * n_visual)), n_visual, n_image_pivots, n_pivots)

    def visual_count(self, n_visual: int) -> int:
        """Visual tokens kept of ``n_visual``: ``P_img + P TOPK`` (with ``pivot_text_tokens`` text pivots)."""
        p_img = min(self.pivot_image_tokens, n_visual)
        n_piv = p_img + self.pivot_text_tokens
        return p_img + n_piv * self.topk(n_visual, p_img, n_piv)


@dataclass(frozen=True)
class DARTConfig(_DARTOptions, LLMMethod):
    """DART in the language model (``form="llm"``, the authors' form). Options: see ``_DARTOptions``."""

    form_name = "llm"

    def check_model(self, model) -> None:
        """K must name a layer of this model's language model."""
        check_pruning_layer(self.k, model)

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:
        """The decoder layer whose input is shortened."""
        return (self.k,)

    def stage_tokens(self, n_visual: int, num_layers: int) -> tuple[int, ...]:
        """Visual tokens from layer K on: ``P_img + P TOPK`` of ``n_visual`` (a prompt with
        ``pivot_text_tokens`` text tokens after the image)."""
        return (self.visual_count(n_visual),)

    def prune(self, ctx: PruneContext) -> Stage:
        """Pivots by layer K-1 key norm, then the visual tokens least like them (normed layer-K input)."""
        if ctx.keys is None or ctx.norm is None:
            raise ValueError("dart's in-LLM form needs layer K-1's keys and the final norm (PruneContext.keys/norm)")
        with torch.no_grad():
            key_norm = ctx.keys().abs().sum((1, 3))  # (B, L): L1 over every head and channel
            states = ctx.norm(ctx.hidden)  # (B, L, D)
            hidden, positions, visual, sources = [], [], [], []
            for r in range(ctx.hidden.shape[0]):  # one row at a time (pivots per row), never per token
                keep = self._keep_row(key_norm[r], states[r], ctx.key_mask[r], ctx.visual[r], ctx.positions[r])
                hidden.append(ctx.hidden[r, keep])
                positions.append(ctx.positions[r, keep])
                visual.append(ctx.visual[r, keep])
                sources.append(keep)
        return Stage(hidden, positions, visual, sources)

    def _keep_row(
        self, key_norm: torch.Tensor, states: torch.Tensor, real: torch.Tensor, vis: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """(L',) long ascending indices one row keeps: its text and DART's visual tokens.

        key_norm: (L,) L1 norms of layer K-1 keys; states: (L, D) normed layer-K input; real, vis: (L,) bool;
        pos: (L,) long positions.
        """
        cand = torch.nonzero(vis & real).squeeze(1)  # (V,) candidates in sequence order
        if cand.numel() == 0:
            return torch.nonzero(real).squeeze(1)
        text = torch.nonzero(~vis & real).squeeze(1)
        text = text[text > cand.max()]  # (M,) the text after the (last) image
        v = cand.numel()
        p_img = min(self.pivot_image_tokens, v)
        p_txt = min(self.pivot_text_tokens, text.numel())
        img_piv = cand[_top(key_norm[cand], p_img)]  # (P_img,) largest key norm first
        txt_piv = text[_top(key_norm[text], p_txt)]  # (P_txt,)
        pivots = torch.cat([img_piv, txt_piv])  # (P,) sequence indices, their insertion order
        visit = pivots[set_order(pos[pivots].tolist())]  # the order their Python set iterates
        free = torch.zeros_like(vis)
        free[cand] = True
        free[img_piv] = False
        kept = least_duplicated(states, states[visit], free, self.topk(v, p_img, pivots.numel()))
        kept[img_piv] = True
        return torch.nonzero(real & (~vis | kept)).squeeze(1)


@dataclass(frozen=True)
class DARTEmbeddingConfig(_DARTOptions, VisionMethod):
    """DART before the language model, on its input embeddings (``form="embedding"``). Options: ``_DARTOptions``."""

    form_name = "embedding"
    form: str = "embedding"

    @property
    def requires(self) -> Requirements:
        """Stock layout (transformers' unpadding), the projected features and the prompt's text embeddings."""
        return Requirements(
            unpad=True, layout="spatial", thumbnail_order="spatial",
            needs=frozenset({"features", "text"}),
        )  # fmt: skip

    def token_count(self, ctx: ImageContext) -> int:
        """Visual tokens of any image of this geometry: P_img + P TOPK (a prompt of >= pivot_text_tokens tokens)."""
        return self.visual_count(stock_length(ctx))

    def select(self, ctx: ImageContext) -> Selection:
        """Pivots and their least-duplicated tokens over the image's stock sequence, in stock order."""
        stock, source = stock_sequence(ctx, "dart")  # (T,), (V N + 1, D)
        with torch.no_grad():
            t = stock.numel()
            retain = int(round(self.retention_ratio * t))
            p_img = min(self.pivot_image_tokens, t)
            n_text = 0 if ctx.text is None else min(self.pivot_text_tokens, ctx.text.shape[0])
            keep = duplication_aware_keep(
                source[stock], ctx.text, retain, self.pivot_image_tokens, self.pivot_text_tokens,
                topk=self.topk(t, p_img, p_img + n_text),
            )  # fmt: skip
        return selection_from_order(stock[keep], ctx)


DARTConfig.forms = DARTEmbeddingConfig.forms = {"llm": DARTConfig, "embedding": DARTEmbeddingConfig}


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


class DARTSelector(ViewSelector):
    """DART inside one view with an exact count: its pivots and the tokens least duplicated by them."""

    name = "dart"
    needs = frozenset({"features", "text"})
    method = DARTEmbeddingConfig
    options = ("pivot_image_tokens", "pivot_text_tokens")

    def prepare(self, ctx: ImageContext, options: dict) -> dict:
        """The image's detached projected features."""
        return {"features": self.projected(ctx)}

    def pick(self, ctx: ImageContext, state: dict, view: int, pos: torch.Tensor, k: int, options: dict):
        """Exactly k candidates, ascending (``dart_keep_exact``)."""
        feats = state["features"][view, pos]
        keep = dart_keep_exact(feats, ctx.text, k, options["pivot_image_tokens"], options["pivot_text_tokens"])
        return pos[keep], None


def _top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest values, largest first; ties: the earlier index."""
    return torch.sort(values.float(), descending=True, stable=True).indices[:k]
