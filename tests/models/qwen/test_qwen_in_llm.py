"""In-LLM methods (FastV, DART, SparseVLM) on Qwen2.5-VL / Qwen3-VL: ``models/llm_pruning.py`` with M-RoPE.

* R = 1 leaves the language model stock, bit for bit (forward and generate);
* the recomputed attention of a decoder layer equals the probabilities stock eager attention computes there
  (Qwen3's per-head q/k norms, Qwen2.5's M-RoPE sections);
* the shortened layers get the rotary embeddings of the kept tokens' own stock 3-D positions;
* Qwen3-VL's DeepStack rows added after the pruning layer are exactly the surviving visual tokens' rows;
* decode positions stay stock's.
"""

from __future__ import annotations

import sys

import pytest
import torch
from qwen_helpers import QWEN, _no_grad, _one_thread, prepare, qwen_batch, record_lm  # noqa: F401

import globalcom2
from globalcom2.models import llm_pruning
from globalcom2.models import qwen_common as qc

GEN = {"max_new_tokens": 4, "do_sample": False}
METHODS = [("fastv", {"k": 1}), ("dart", {"k": 1}), ("sparsevlm", {"layers": (0, 1, 2)})]


def _model(family, **kw):
    return QWEN[family][0](text_layers=4, **kw), QWEN[family][1]()


@pytest.mark.parametrize("family", list(QWEN))
@pytest.mark.parametrize("method,options", [m for m in METHODS if m[0] != "dart"], ids=lambda v: str(v))
def test_r1_is_stock_bit_for_bit(family, method, options):
    """(DART keeps ``P_img + P TOPK`` of V even at R = 1, by its authors' count: not a stock-preserving R.)"""
    model, proc = _model(family)
    inputs = qwen_batch(proc)
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, **GEN)
    globalcom2.apply(model, method, retention_ratio=1.0, **options)
    assert torch.equal(model(**inputs).logits, ref)
    assert torch.equal(model.generate(**inputs, **GEN), ref_gen)


@pytest.mark.parametrize("family", list(QWEN))
def test_recomputed_attention_is_stock_eager_attention(family, monkeypatch):
    """``attention_probs`` (the scores FastV/SparseVLM read) equals stock eager attention's probabilities."""
    model, proc = _model(family, attn_implementation="eager")
    inputs = qwen_batch(proc)
    lm = model.model.language_model
    mod = sys.modules[type(lm.layers[0].self_attn).__module__]
    stock_eager, weights = mod.eager_attention_forward, []

    def recording(module, *args, **kwargs):
        out, w = stock_eager(module, *args, **kwargs)
        weights.append((module, w))
        return out, w

    captured = {}

    def hook(layer, args, kwargs):
        captured.setdefault(id(layer), (args[0] if args else kwargs["hidden_states"], kwargs["position_embeddings"]))

    monkeypatch.setattr(mod, "eager_attention_forward", recording)
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in lm.layers]
    try:
        model(**inputs)
    finally:
        for h in handles:
            h.remove()
    mask = inputs["attention_mask"].bool()
    for layer in lm.layers:
        hidden, cos_sin = captured[id(layer)]
        stock = next(w for m, w in weights if m is layer.self_attn).float()  # (B, H, L, L)
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # last real token of every row
        queries = torch.stack([last, last - 1], 1)  # (B, 2)
        ours = llm_pruning.attention_probs(layer, hidden, cos_sin, mask, queries)
        want = torch.stack([stock[b][:, queries[b]] for b in range(mask.shape[0])])  # (B, H, 2, L)
        keys = want.new_ones(()).bool() & mask[:, None, None, :]
        assert torch.allclose(ours.masked_fill(~keys, 0), want.masked_fill(~keys, 0), atol=1e-5)


@pytest.mark.parametrize("family", list(QWEN))
@pytest.mark.parametrize("method,options", METHODS, ids=lambda v: str(v))
def test_shortened_layers_get_the_kept_tokens_stock_3d_positions(family, method, options, monkeypatch):
    model, proc = _model(family)
    inputs = qwen_batch(proc)
    globalcom2.apply(model, method, retention_ratio=0.4, **options)
    cfg = globalcom2.get_config(model)
    lm = model.model.language_model
    k = cfg.prune_layers(len(lm.layers))[0]
    seen = {}

    def pre(layer, args, kwargs):
        seen.setdefault("cos_sin", kwargs["position_embeddings"])
        seen.setdefault("len", (args[0] if args else kwargs["hidden_states"]).shape[1])

    stock_prune = type(cfg).prune
    stages = []

    def prune(self, ctx):
        stage = stock_prune(self, ctx)
        stages.append((ctx, stage))
        return stage

    monkeypatch.setattr(type(cfg), "prune", prune)
    handle = lm.layers[k].self_attn.register_forward_pre_hook(pre, with_kwargs=True)  # after the pruning hook
    rec, rec_handle = record_lm(model)
    try:
        model(**inputs)
    finally:
        handle.remove()
        rec_handle.remove()
    full = rec[0]["position_ids"][-3:]  # (3, B, L) the packed prompt's stock positions
    ctx, stage = stages[0]
    assert seen["len"] < full.shape[-1]  # the layer's input was shortened
    mask = rec[0]["attention_mask"].bool()
    rotary = []
    for b, pos in enumerate(stage.positions):  # 1-D ranks -> their columns -> stock 3-D positions
        cols = torch.nonzero(mask[b]).squeeze(1)[pos]
        rotary.append(full[:, b, cols])
    width = max(r.shape[1] for r in rotary)
    want = torch.zeros(3, len(rotary), width, dtype=full.dtype)
    for b, r in enumerate(rotary):
        want[:, b, width - r.shape[1] :] = r
    sections = lm.config.rope_parameters.get("mrope_section")
    expected = llm_pruning.merged_cos_sin(lm.rotary_emb(torch.zeros(1), want), sections)  # each (B, L', hd)
    got = llm_pruning.merged_cos_sin(seen["cos_sin"], sections)
    for b, r in enumerate(rotary):
        sl = slice(width - r.shape[1], width)
        for g, e in zip(got, expected):
            assert torch.equal(g[b, sl], e[b, sl])


@pytest.mark.parametrize("method,options", METHODS, ids=lambda v: str(v))
def test_deepstack_rows_follow_the_surviving_visual_tokens(method, options, monkeypatch):
    """Qwen3-VL: DeepStack levels after the pruning layer add exactly the kept visual tokens' stock rows."""
    model, proc = _model("qwen3_vl")
    inputs = qwen_batch(proc)
    globalcom2.apply(model, method, retention_ratio=0.4, **options)
    lm = model.model.language_model
    calls = []
    stock = type(lm)._deepstack_process

    def spy(self, hidden, masks, embeds):
        calls.append((hidden.shape[1], masks.clone(), embeds.clone()))
        return stock(self, hidden, masks, embeds)

    monkeypatch.setattr(type(lm), "_deepstack_process", spy)
    rec, handle = record_lm(model)
    try:
        model(**inputs)
    finally:
        handle.remove()
    full_masks = rec[0]["visual_pos_masks"]
    levels = rec[0]["deepstack_visual_embeds"]
    assert len(calls) == len(levels)
    short = [(i, c) for i, c in enumerate(calls) if c[0] < full_masks.shape[1]]
    assert short, "some DeepStack level must meet the shortened sequence"
    row_of = (full_masks.flatten().long().cumsum(0) - 1).view_as(full_masks)
    for level, (_, masks, embeds) in short:
        assert int(masks.sum()) == embeds.shape[0] < int(full_masks.sum())
        # each added row is one of the stock rows, in order, and each stock row at most once
        hit = [(levels[level] == e).all(-1).nonzero().squeeze(1).tolist() for e in embeds]
        picked = [h[0] for h in hit]
        assert all(len(h) == 1 for h in hit) and picked == sorted(set(picked))
        assert set(picked) <= set(row_of[full_masks].tolist())


@pytest.mark.parametrize("family", list(QWEN))
def test_decode_positions_stay_stock(family):
    model, proc = _model(family)
    inputs = qwen_batch(proc)
    seen, handle = record_lm(model)
    try:
        model.generate(**inputs, **GEN)
        n_stock = len(seen)
        globalcom2.apply(model, "fastv", retention_ratio=0.3, k=1)
        model.generate(**inputs, **GEN)
    finally:
        handle.remove()
    stock_steps = [s["position_ids"][-3:] for s in seen[1:n_stock]]
    ours = [s["position_ids"][-3:] for s in seen[n_stock + 1 :]]
    assert len(ours) == len(stock_steps) == GEN["max_new_tokens"] - 1
    for a, b in zip(ours, stock_steps):
        assert torch.equal(a, b)
    stock_pos, _ = qc.stock_position_ids(model, inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    assert torch.equal(ours[0][:, :, 0], stock_pos[:, :, -1] + 1)
