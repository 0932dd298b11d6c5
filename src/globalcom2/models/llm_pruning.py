"""Pruning visual tokens *inside* a Llama-family language model (FastV, SparseVLM, DART).

The stock decoder loop runs unchanged; for the duration of one ``forward``/``generate`` call,
forward pre-hooks on the decoder layers swap in the shortened hidden states, attention mask and
rotary embeddings from the first pruning layer on. Each layer's KV cache therefore holds exactly
the tokens that layer saw (full length before the first pruning layer, shorter after), and
decoding steps get a mask of the matching length. The hooks are removed when the call returns,
so the model carries no extra state between calls.

Works with eager and SDPA attention, any batch (rows are pruned independently and re-aligned
with left padding), and ``generate``.

Multimodal rotary positions (Qwen2.5-VL / Qwen3-VL's M-RoPE, position_ids (3, B, L), or (4, B, L) with
a leading 1-D text row) are carried alongside: the methods see each token's 1-D position (its rank among
the row's attended prompt tokens, padding-invariant, as for 1-D RoPE), and the shortened layers get the
rotary embeddings of the kept tokens' own 3-D positions (a token a method makes, SparseVLM's recycled
cluster, takes the 3-D position of the token whose 1-D position it was given). Queries and keys are
recomputed as the layer computes them (per-head ``q_norm``/``k_norm`` where the layer has them, Qwen3;
M-RoPE sections merged where the rotary embedding leaves them split, transformers 5.0's Qwen2.5-VL).
Per-token inputs a language model adds after some layers (Qwen3-VL's DeepStack, ``_deepstack_process``)
follow the kept tokens. Llama-family models take none of these paths and run as before, bit for bit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from ..methods.base import PruneContext, Stage


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The rotate-half of standard RoPE (Llama, Mistral, Qwen2)."""
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def check_language_model(lm: nn.Module) -> None:
    """Raise unless ``lm`` is a Llama-style decoder the in-LLM methods can drive."""
    layers = getattr(lm, "layers", None)
    first = layers[0] if layers is not None and len(layers) else None
    attn = getattr(first, "self_attn", None)
    if (
        first is None
        or not hasattr(first, "input_layernorm")
        or not all(hasattr(attn, n) for n in ("q_proj", "k_proj", "head_dim"))
    ):
        raise TypeError(
            "in-LLM methods (fastv, sparsevlm, dart) need a Llama-style language model (layers with input_layernorm, "
            f"self_attn.q_proj/k_proj and rotary embeddings); got {type(lm).__name__}"
        )


#: cache kinds whose layers may hold different lengths (pruned layers cache fewer prompt tokens)
CACHE_IMPLEMENTATIONS = (None, "dynamic")


def check_call_options(model: nn.Module, kwargs: dict) -> None:
    """Raise ValueError, before any work, for ``forward``/``generate`` options in-LLM pruning cannot honour.

    Layers after a pruning layer cache fewer prompt tokens than the layers before it, which only a
    dynamic KV cache allows; a static (pre-allocated, one length for all layers) cache does not.
    """
    gen_cfg = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if "cache_implementation" in kwargs:
        impl = kwargs["cache_implementation"]
    else:
        impl = getattr(gen_cfg, "cache_implementation", None)
    if impl not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"cache_implementation must be one of ({', '.join(map(repr, CACHE_IMPLEMENTATIONS))}) with in-LLM "
            f"methods (fastv, sparsevlm, dart): their pruned layers cache fewer tokens than the others; got {impl!r}"
        )
    cache = kwargs.get("past_key_values")
    if cache is not None and type(cache) is not DynamicCache:
        raise ValueError(
            "past_key_values must be None or a DynamicCache with in-LLM methods (fastv, sparsevlm, dart): their "
            f"pruned layers cache fewer tokens than the others; got {type(cache).__name__}"
        )


def merged_cos_sin(
    cos_sin: tuple[torch.Tensor, torch.Tensor], sections: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary (cos, sin), each (B|1, L, hd): as given, or merged from M-RoPE's (3, B, L, hd) by ``sections``
    (frequency band i takes axis i % 3, as ``apply_multimodal_rotary_pos_emb`` does)."""
    cos, sin = cos_sin
    if cos.dim() == 3:
        return cos, sin
    if not sections:
        raise ValueError("3-axis rotary embeddings need the model's mrope_section (text_config.rope_parameters)")
    split = list(sections) * 2
    return tuple(torch.cat([m[i % 3] for i, m in enumerate(t.split(split, dim=-1))], dim=-1) for t in (cos, sin))


def _heads(x: torch.Tensor, head_dim: int, norm: nn.Module | None) -> torch.Tensor:
    """(B, H, L, hd) float32 heads of a projection x: (B, L, H * hd), through the layer's per-head norm if any."""
    b, length = x.shape[:2]
    h = x.view(b, length, -1, head_dim)
    if norm is not None:  # Qwen3: q_norm / k_norm on each head, in the model's dtype, before the rotary
        h = norm(h)
    return h.float().transpose(1, 2)


def rotary_keys(
    keys: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], head_dim: int, norm: nn.Module | None = None,
    sections: list[int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """(B, Hkv, L, hd) float32 rotated keys from a layer's ``k_proj`` output keys: (B, L, Hkv * hd).

    cos_sin: rotary (cos, sin), each (B|1, L, hd) (or M-RoPE's split (3, B, L, hd) with ``sections``);
    norm: the layer's ``k_norm`` where it has one.
    """
    b = keys.shape[0]
    cos, sin = (t.float().expand(b, -1, -1)[:, None] for t in merged_cos_sin(cos_sin, sections))  # (B, 1, L, hd)
    k = _heads(keys, head_dim, norm)  # (B, Hkv, L, hd)
    return k * cos + rotate_half(k) * sin


@torch.no_grad()
def attention_probs(
    layer: nn.Module,
    hidden: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor,
    queries: torch.Tensor,
    keys: torch.Tensor | None = None,
    sections: list[int] | None = None,
) -> torch.Tensor:
    """Softmax attention of selected query rows of one decoder layer, recomputed from its input.

    hidden: (B, L, D) input of the layer; cos_sin: rotary (cos, sin), each (B|1, L, hd);
    key_mask: (B, L) bool keys that may be attended; queries: (B, Q) long query positions
    (each query attends causally to keys at or before it); keys: optional (B, L, Hkv * hd) output
    of the layer's own ``k_proj`` on this input (the pruning hooks capture it as the layer runs, so
    only the Q query rows are projected here), recomputed when None; sections: M-RoPE's ``mrope_section``
    where ``cos_sin`` is split by axis. Per-head q/k norms are applied where the layer has them.
    returns: (B, H, Q, L) float32 probabilities.
    """
    attn = layer.self_attn
    hd = attn.head_dim
    b, length, _ = hidden.shape
    if queries.shape[1] == 0:  # no query rows (e.g. no text to rate with): nothing to compute
        return hidden.new_zeros(b, attn.q_proj.out_features // hd, 0, length, dtype=torch.float32)
    x = layer.input_layernorm(hidden)  # (B, L, D)
    if sections is None:  # the layer's own M-RoPE sections, where its rotary leaves them split (transformers 5.0)
        sections = (getattr(getattr(attn, "config", None), "rope_parameters", None) or {}).get("mrope_section")
    cos_sin = merged_cos_sin(cos_sin, sections)
    cos, sin = (t.float().expand(b, -1, -1) for t in cos_sin)
    xq = torch.gather(x, 1, queries[..., None].expand(-1, -1, x.shape[-1]))  # (B, Q, D)
    q = _heads(attn.q_proj(xq), hd, getattr(attn, "q_norm", None))  # (B, H, Q, hd)
    k = rotary_keys(attn.k_proj(x) if keys is None else keys, cos_sin, hd, getattr(attn, "k_norm", None))
    qcos = torch.gather(cos, 1, queries[..., None].expand(-1, -1, hd))[:, None]
    qsin = torch.gather(sin, 1, queries[..., None].expand(-1, -1, hd))[:, None]
    q = q * qcos + rotate_half(q) * qsin
    if q.shape[1] != k.shape[1]:  # GQA
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) * attn.scaling  # (B, H, Q, L)
    allowed = key_mask[:, None, None, :] & (
        torch.arange(length, device=x.device)[None, None, None, :] <= queries[:, None, :, None]
    )
    logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.softmax(-1)


@dataclass
class _CallState:
    """What the hooks of one call share: the current (shortened) sequence and the decode bookkeeping."""

    prev_input: dict = field(default_factory=dict)
    key_mask: torch.Tensor | None = None  # (B, L) of the current sequence (after last stage)
    positions: torch.Tensor | None = None
    visual: torch.Tensor | None = None
    n_visual_full: torch.Tensor | None = None
    decode_mask: torch.Tensor | None = None  # 2D mask of the prompt as seen by pruned layers
    prompt_len: int = 0
    pruned_from: int | None = None  # first layer that sees the shortened sequence
    lm_mask: torch.Tensor | None = None  # the 2D mask handed to the LM this step
    is_prefill: bool = True
    cos_sin: tuple | None = None
    decoded: int = 0  # tokens appended after the prompt so far
    prompt: tuple | None = None  # (embeds, key mask, visual, positions) of the LM input at prefill
    stage_masks: dict = field(default_factory=dict)  # first layer of a stage -> its prompt key mask
    step_masks: dict = field(default_factory=dict)  # first layer of a stage -> its layer mask this decoding step
    rotary: torch.Tensor | None = None  # (3, B, L0) M-RoPE positions of the prompt's columns, or None (1-D RoPE)
    rank_cols: torch.Tensor | None = None  # (B, L0) prompt column of each 1-D position (rank), M-RoPE only
    columns: torch.Tensor | None = None  # (B, L) prompt column of each current token, -1 for a made one


def _pad_left(rows: list[torch.Tensor], fill: float | int | bool = 0) -> torch.Tensor:
    n = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), n, *rows[0].shape[1:]), fill)
    for i, r in enumerate(rows):
        if r.shape[0]:
            out[i, n - r.shape[0] :] = r
    return out


def _layer_mask(key_mask: torch.Tensor, q_len: int, dtype: torch.dtype, eager: bool) -> torch.Tensor | None:
    """(B, 1, q_len, L) causal mask for the last ``q_len`` positions over keys ``key_mask`` (B, L).

    None under SDPA when every key is real: SDPA then runs causally (``is_causal``) as the stock
    model does without padding, skipping the masked half of the attention instead of reading an
    L x L mask.
    """
    length = key_mask.shape[1]
    if not eager and (q_len == 1 or q_len == length) and bool(key_mask.all()):
        return None
    q_pos = torch.arange(length - q_len, length, device=key_mask.device)
    allowed = key_mask[:, None, None, :] & (torch.arange(length, device=key_mask.device)[None, :] <= q_pos[:, None])
    # rows with no allowed key (left padding) attend to themselves, avoiding NaN; their output is unused
    diag = (torch.arange(length, device=key_mask.device)[None, :] == q_pos[:, None])[None, None]
    allowed = allowed | (diag & ~allowed.any(-1, keepdim=True))
    if not eager:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _unchanged(out: Stage, hidden: torch.Tensor, key_mask: torch.Tensor, positions: torch.Tensor) -> bool:
    """Whether a stage kept every row exactly as it was: hidden (B, L, D), key_mask / positions (B, L)."""
    if [h.shape[0] for h in out.hidden] != key_mask.sum(1).tolist():
        return False
    return all(
        torch.equal(h, hidden[row, key_mask[row]]) and torch.equal(p, positions[row, key_mask[row]])
        for row, (h, p) in enumerate(zip(out.hidden, out.positions))
    )


class _Hooks:
    """The pre-hooks of one call, in the order a forward pass meets them: the language model's (a new prompt or a
    decoding step), each decoder layer's (shorten at a pruning layer; masks and rotary for the shortened
    layers), the ``k_proj`` of each layer before a pruning layer (its keys, captured as it runs)."""

    def __init__(self, model: nn.Module, plan, spans: list[list[tuple[int, int]]], lm: nn.Module) -> None:
        self.plan, self.spans, self.lm = plan, spans, lm
        self.layers = lm.layers
        impl = getattr(model.config.text_config, "_attn_implementation", "sdpa")
        if impl not in ("eager", "sdpa"):
            raise ValueError(
                f"in-LLM methods support attn_implementation 'eager' or 'sdpa', the language model uses {impl!r}"
            )
        self.eager = impl == "eager"
        self.prune_at = set(plan.prune_layers(len(self.layers)))
        self.state = _CallState()
        self.handles: list = []
        rope = getattr(getattr(lm, "config", None), "rope_parameters", None) or {}
        self.sections = rope.get("mrope_section") if isinstance(rope, dict) else None
        self.side_inputs = hasattr(lm, "_deepstack_process")  # Qwen3-VL: DeepStack rows after the first layers

    # -- installation ----------------------------------------------------------------------------

    def install(self) -> None:
        """Register every hook (removed by ``remove``)."""
        self.handles.append(self.lm.register_forward_pre_hook(self.on_language_model, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
            if i + 1 in self.prune_at:
                self.handles.append(layer.self_attn.k_proj.register_forward_hook(self.on_keys))
        if self.side_inputs:  # the instance attribute shadows the class's method for this call only
            self.lm._deepstack_process = self.on_deepstack

    def remove(self) -> None:
        """Remove every hook: the model carries no state after the call."""
        for h in self.handles:
            h.remove()
        if self.side_inputs:
            del self.lm._deepstack_process

    # -- the language model: a new prompt or a decoding step ---------------------------------------

    def on_language_model(self, _mod, args, kwargs):
        """Start of a forward of the decoder stack: a prompt (reset, mark the visual tokens) or a decoding step."""
        state = self.state
        embeds = kwargs.get("inputs_embeds")
        state.lm_mask = kwargs.get("attention_mask")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        fresh = cache is None or cache.get_seq_length() == 0
        state.is_prefill = embeds is not None and fresh
        state.step_masks = {}
        if not state.is_prefill and embeds is not None:
            state.decoded += embeds.shape[1]
        if state.is_prefill:  # a new prompt (or a cache-less step re-running the whole sequence)
            self._start_prompt(embeds, kwargs.get("position_ids"))
        return None

    def _start_prompt(self, embeds: torch.Tensor, pos: torch.Tensor | None) -> None:
        """Reset the call state for a prompt of ``embeds`` (B, L, D): key mask, positions, visual tokens."""
        state = self.state
        state.pruned_from, state.decoded, state.stage_masks = None, 0, {}
        b, length = embeds.shape[:2]
        mask = state.lm_mask.bool() if state.lm_mask is not None else torch.ones(b, length, dtype=torch.bool)
        state.prompt_len = length
        state.key_mask = mask.to(embeds.device)
        state.rotary = state.rank_cols = None
        state.columns = torch.arange(length, device=embeds.device).expand(b, -1)
        if pos is not None and pos.dim() == 3:  # M-RoPE: (3, B, L) or (4, B, L) with the 1-D text row first
            state.rotary = pos[-3:].expand(-1, b, -1)
            ranks = (state.key_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L) 1-D position of every column
            state.positions = ranks
            cols = torch.zeros(b, length, dtype=torch.long, device=embeds.device)
            every = torch.arange(length, device=embeds.device).expand(b, -1)
            cols.scatter_(1, ranks.masked_fill(~state.key_mask, length - 1), every)
            state.rank_cols = cols  # rank r of row b -> its column (the last slot collects padding, never read)
        else:
            state.positions = pos.expand(b, -1) if pos is not None else (state.key_mask.long().cumsum(-1) - 1)
        vis = torch.zeros(b, length, dtype=torch.bool, device=embeds.device)
        expand = b // max(len(self.spans), 1)  # beams / num_return_sequences repeat each row
        for row, row_spans in enumerate(s for s in self.spans for _ in range(expand)):
            for s, e in row_spans:
                vis[row, s:e] = True
        state.visual = vis
        state.n_visual_full = vis.sum(1)
        state.prompt = (embeds, state.key_mask, vis, state.positions)

    # -- decoder layers ----------------------------------------------------------------------------

    def _layer_hook(self, idx: int):
        def hook(layer, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.state.is_prefill:
                hidden = self._prefill_layer(idx, hidden, kwargs)
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs["hidden_states"] = hidden
            elif self.state.pruned_from is not None and idx >= self.state.pruned_from:
                kwargs["attention_mask"] = self._decode_mask(idx, hidden)
            return args, kwargs

        return hook

    def _prefill_layer(self, idx: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """At prefill: shorten the input of a pruning layer; give shortened layers their mask and rotary."""
        state = self.state
        if idx in self.prune_at:
            hidden = self._prune(idx, hidden)
        if state.pruned_from is not None and idx >= state.pruned_from:
            kwargs["attention_mask"] = _layer_mask(state.key_mask, hidden.shape[1], hidden.dtype, self.eager)
            kwargs["position_embeddings"] = state.cos_sin
            kwargs["position_ids"] = state.positions
        if idx + 1 in self.prune_at:  # its k_proj output is captured by on_keys as the layer runs
            state.prev_input = {"hidden": hidden, "cos_sin": kwargs["position_embeddings"], "keys": None}
        return hidden

    def _decode_mask(self, idx: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """A decoding step's mask for a shortened layer: its stage's prompt keys, then every decoded token."""
        state = self.state
        new = state.lm_mask[:, state.prompt_len :] if state.lm_mask is not None else None
        if new is None or new.shape[1] != state.decoded:
            new = torch.ones(hidden.shape[0], state.decoded, dtype=torch.bool, device=hidden.device)
        start = max(k for k in state.stage_masks if k <= idx)  # this layer's pruning stage
        if start not in state.step_masks:  # one mask per stage and step, shared by its layers
            prompt_keys = state.stage_masks[start]
            keys = torch.cat([prompt_keys, new.bool().to(prompt_keys.device)], dim=1)
            state.step_masks[start] = _layer_mask(keys, hidden.shape[1], hidden.dtype, self.eager)
        return state.step_masks[start]

    def on_keys(self, _mod, _args, out):
        """``k_proj`` output (B, L, Hkv * hd) of the layer before a pruning layer, kept for the method."""
        if self.state.is_prefill and "keys" in self.state.prev_input:
            self.state.prev_input["keys"] = out

    # -- one pruning stage -------------------------------------------------------------------------

    def _context(self, idx: int, hidden: torch.Tensor) -> PruneContext:
        """What the method sees at pruning layer ``idx``: attention/keys of layer ``idx - 1``, the sequence."""
        state, prev, prev_layer = self.state, self.state.prev_input, self.layers[idx - 1]

        def probs(queries: torch.Tensor) -> torch.Tensor:
            return attention_probs(
                prev_layer, prev["hidden"], prev["cos_sin"], state.key_mask, queries, keys=prev.get("keys"),
                sections=self.sections,
            )  # fmt: skip

        def keys() -> torch.Tensor:
            k = prev.get("keys")
            attn = prev_layer.self_attn
            if k is None:  # pragma: no cover - the hook captures it whenever the layer ran
                k = attn.k_proj(prev_layer.input_layernorm(prev["hidden"]))
            return rotary_keys(k, prev["cos_sin"], attn.head_dim, getattr(attn, "k_norm", None), self.sections)

        return PruneContext(
            layer_idx=idx,
            stage=sorted(self.prune_at).index(idx),
            hidden=hidden,
            key_mask=state.key_mask,
            positions=state.positions,
            visual=state.visual,
            probs=probs,
            n_visual_full=state.n_visual_full,
            prompt=state.prompt,
            num_layers=len(self.layers),
            keys=keys,
            norm=self.lm.norm,
        )

    def _prune(self, idx: int, hidden: torch.Tensor) -> torch.Tensor:
        """Run the method at layer ``idx`` and re-align its rows (left padding); the new input of the layer."""
        state, plan = self.state, self.plan
        out: Stage = plan.prune(self._context(idx, hidden))
        state.prev_input = {}
        empty = [row for row, h in enumerate(out.hidden) if h.shape[0] == 0]
        if empty:
            raise ValueError(
                f"row(s) {empty} of the batch would keep no token at all after decoder layer {idx - 1}: their "
                f"prompt is only image placeholders and {plan.name} keeps none of the image's tokens at "
                f"retention_ratio={plan.retention_ratio}; raise retention_ratio or put text in the prompt"
            )
        if _unchanged(out, hidden, state.key_mask, state.positions):  # nothing pruned (e.g. R = 1): stock layers
            return hidden
        state.key_mask = _pad_left([torch.ones(h.shape[0], dtype=torch.bool, device=hidden.device) for h in out.hidden])
        new_hidden = _pad_left(out.hidden)
        state.positions = _pad_left(out.positions)
        state.visual = _pad_left(out.visual, False)
        state.columns = self._columns(out)
        if state.rotary is None:
            state.cos_sin = self.lm.rotary_emb(new_hidden, position_ids=state.positions)
        else:  # each token's own 3-D position, found from its 1-D one
            cols = state.rank_cols.gather(1, state.positions)  # (B, L') prompt columns
            rotary = state.rotary.gather(2, cols[None].expand(3, -1, -1))  # (3, B, L')
            state.cos_sin = self.lm.rotary_emb(new_hidden, position_ids=rotary)
        if state.pruned_from is None:
            state.pruned_from = idx
        state.stage_masks[idx] = state.key_mask
        return new_hidden

    def _columns(self, out: Stage) -> torch.Tensor | None:
        """(B, L') prompt column of every token after a stage (-1: made by the method; padding -1), from the
        stage's ``sources``; None when the method does not report them."""
        old = self.state.columns
        if out.sources is None or old is None:
            return None
        rows = []
        for row, src in enumerate(out.sources):  # rows, never tokens
            src = src.to(old.device)
            rows.append(torch.where(src >= 0, old[row, src.clamp(min=0)], src.new_full(src.shape, -1)))
        return _pad_left(rows, -1)

    # -- per-token inputs added after some layers (Qwen3-VL's DeepStack) ------------------------------

    def on_deepstack(self, hidden: torch.Tensor, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
        """``_deepstack_process`` for this call: stock while the sequence is the prompt's; after a pruning layer,
        the rows of the visual tokens still present, at their new slots (made tokens get none)."""
        stock = type(self.lm)._deepstack_process.__get__(self.lm)
        state = self.state
        if not state.is_prefill or state.pruned_from is None:
            return stock(hidden, visual_pos_masks, visual_embeds)
        if state.columns is None:
            raise ValueError(
                f"{self.plan.name} does not report which tokens it kept (Stage.sources), which the language "
                "model's DeepStack inputs need after its pruning layer"
            )
        masks = visual_pos_masks.to(hidden.device)  # (B, L0) over the prompt's columns
        row_of = (masks.flatten().long().cumsum(0) - 1).view_as(masks)  # (B, L0) DeepStack row of a visual column
        cols = state.columns.clamp(min=0)  # (B, L)
        take = (state.columns >= 0) & masks.gather(1, cols)  # (B, L) tokens that are still prompt visual tokens
        rows = row_of.gather(1, cols)[take]  # (K',) in (row, slot) order, as the boolean mask reads them
        return stock(hidden, take, visual_embeds.to(hidden.device)[rows])


@contextlib.contextmanager
def pruning(
    model: nn.Module, plan, spans: list[list[tuple[int, int]]], lm: nn.Module | None = None
) -> Iterator[_CallState]:
    """Install the pruning hooks for one call. ``plan`` is an in-LLM method config.

    spans: per batch row, the [start, end) positions of every image's tokens in the LM input.
    lm: the decoder stack (default ``model.model.language_model``).
    """
    hooks = _Hooks(model, plan, spans, model.model.language_model if lm is None else lm)
    hooks.install()
    try:
        yield hooks.state
    finally:
        hooks.remove()
