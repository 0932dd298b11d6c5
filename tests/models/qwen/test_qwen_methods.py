"""What each method does on Qwen2.5-VL / Qwen3-VL: scorers, what is refused and why, what "auto" options become,
and the two methods whose authors have a Qwen2.5-VL path, against oracles written from that code:

* DART (their ``get_retained_image_token`` on Qwen2.5-VL: ``tests/oracles/reference_dart_qwen.py``);
* DivPrune (the community port their README links: ``tests/oracles/reference_divprune_qwen.py``).
"""

from __future__ import annotations

import sys

import pytest
import torch
from qwen_helpers import QWEN, _no_grad, _one_thread, prepare, qwen_batch  # noqa: F401

import globalcom2
from globalcom2.models import adapter_for
from globalcom2.models import qwen_common as qc
from globalcom2.testing import demo_image, qwen_prompt
from oracles.reference_dart_qwen import reference_qwen_keep
from oracles.reference_divprune_qwen import port_count, port_divprune, port_features

# ------------------------------------------------------------------------------------ what resolves to what


def test_auto_options_take_the_family_values(qwen):
    family, model, _ = qwen
    adapter = adapter_for(model)
    cases = {
        "globalcom2": {"scorer": "attention_received", "layout": "spatial"},
        "fastervlm": {"scorer": "attention_received"},
        "visionzip": {"scorer": "attention_received"},
        "divprune": {"space": "tower"},
        "cdpruner": {"budget": "exact"},
        "composed": {"layout": "spatial"},
    }
    for name, want in cases.items():
        cfg = adapter.resolve(globalcom2.make_config(name), model.config)
        assert {k: getattr(cfg, k) for k in want} == want, name
    for form in ("llm", "embedding"):
        assert adapter.resolve(globalcom2.make_config("dart", form=form), model.config).topk_rule == "qwen2_5_vl"
    # an explicit choice is kept
    assert adapter.resolve(globalcom2.make_config("divprune", space="projected"), model.config).space == "projected"
    assert globalcom2.apply(model, "fastervlm", scorer="global_dissimilarity") is model


@pytest.mark.parametrize("name", ["thumbnail_only", "crops_only", "drop_random_crop", "drop_important_crop"])
def test_view_subsets_are_refused_with_a_reason(qwen, name):
    _, model, proc = qwen
    with pytest.raises(ValueError, match=rf"'{name}' does not run on Qwen.*no thumbnail and no crops"):
        globalcom2.apply(model, name)
    assert not globalcom2.is_patched(model)
    with pytest.raises(ValueError, match=name):
        globalcom2.num_image_tokens(model.config, (200, 300), name, processor=proc)


def test_cls_scorer_and_composed_visionzip_are_refused(qwen):
    _, model, _ = qwen
    with pytest.raises(ValueError, match=r"scorer='cls' needs a \[CLS\] token"):
        globalcom2.apply(model, "globalcom2", scorer="cls")
    with pytest.raises(ValueError, match="selector='visionzip' does not run on Qwen"):
        globalcom2.apply(model, "composed", selector="visionzip")
    assert not globalcom2.is_patched(model)


# ------------------------------------------------------------------------------------------------ scores


def test_attention_received_is_the_towers_attention_relative_to_uniform():
    """Qwen3-VL (full attention): a token's score is its patches' mean received attention x the image's patches."""
    model, proc = QWEN["qwen3_vl"][0](), QWEN["qwen3_vl"][1]()
    inputs = qwen_batch(proc)
    globalcom2.apply(model, "fastervlm", retention_ratio=0.5)
    batch = prepare(model, inputs)
    raw = qc.vision_attention_received(model, inputs["pixel_values"], inputs["image_grid_thw"]).tokens
    unit = model.config.vision_config.spatial_merge_size**2
    for rec, r, g in zip(batch.records, raw, inputs["image_grid_thw"]):
        slots, valid = rec.layout.slots()
        want = r * (int(g.prod()) / unit)  # sum of raw probabilities / m^2 x patches of the image
        assert torch.allclose(rec.scores[1:][valid], want[slots[valid]], rtol=1e-5)


def test_windowed_scoring_block_is_relative_to_each_window():
    """Qwen2.5-VL with a windowed last block: every window's patches average one share of attention."""
    model = QWEN["qwen2_5_vl"][0](fullatt_block_indexes=(0,))  # the last block attends in windows
    proc = QWEN["qwen2_5_vl"][1]()
    inputs = proc(images=[demo_image(height=130, width=150, seed=5)], text=[qwen_prompt()], return_tensors="pt")
    vis = model.model.visual
    seen = {}
    handle = qc.capture_block_input(vis.blocks[-1], seen)
    model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    handle.remove()
    received, size = qc.attention_received(vis.blocks[-1], seen["input"])
    cu = seen["input"].cu_seqlens.long().tolist()
    assert len(cu) > 2  # several windows
    rel = received * size.float()
    for a, b in zip(cu[:-1], cu[1:]):
        if b > a:
            assert abs(float(rel[a:b].mean()) - 1.0) < 1e-5


# ---------------------------------------------------------------------------- authors' Qwen paths: DART


def _dart_authors_inputs(model, inputs, k):
    """Their ``any_states`` (rotary keys of layer K-1) and ``last_layer_state`` from the stock model."""
    lm = model.model.language_model
    hs = model(**inputs, output_hidden_states=True).hidden_states  # hs[i]: input of layer i
    pos, _ = qc.stock_position_ids(model, inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    layer = lm.layers[k - 1]
    attn = layer.self_attn
    x = layer.input_layernorm(hs[k - 1])
    b, length, _ = x.shape
    q = attn.q_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
    key = attn.k_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
    cos, sin = lm.rotary_emb(x, pos)
    mod = sys.modules[type(attn).__module__]
    if hasattr(mod, "apply_multimodal_rotary_pos_emb"):  # transformers 5.0: sections merged in the attention
        _, key = mod.apply_multimodal_rotary_pos_emb(q, key, cos, sin, lm.config.rope_parameters["mrope_section"])
    else:
        _, key = mod.apply_rotary_pos_emb(q, key, cos, sin)
    return key.permute(0, 2, 1, 3).reshape(b, length, -1)[0], lm.norm(hs[k])[0]


@pytest.mark.parametrize("size,ratio,k", [((220, 300), 0.5, 2), ((300, 260), 0.25, 2), ((330, 180), 0.5, 1)])  # (h, w)
def test_dart_matches_the_authors_qwen2_5_vl_code(size, ratio, k):
    model = QWEN["qwen2_5_vl"][0](text_layers=4)
    proc = QWEN["qwen2_5_vl"][1](max_pixels=(9 * 28) ** 2)  # up to 81 tokens: TOPK > 1
    image = demo_image(height=size[0], width=size[1], seed=size[1])
    inputs = proc(images=[image], text=[qwen_prompt("what is in this picture ?")],
                  return_tensors="pt")  # fmt: skip
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id).squeeze(1)
    start, n_image = int(image[0]), image.numel()
    any_states, last_state = _dart_authors_inputs(model, inputs, k)
    expect = reference_qwen_keep(any_states, last_state, start, n_image, 1 - ratio)
    globalcom2.apply(model, "dart", retention_ratio=ratio, k=k)
    seen = []
    hook = model.model.language_model.layers[k].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    try:
        model(**inputs)
    finally:
        hook.remove()
    kept = seen[0][0].tolist()  # 1-D positions = columns of the one unpadded row
    assert [p for p in kept if start <= p < start + n_image] == expect
    assert [p for p in kept if not start <= p < start + n_image] == [
        i for i in range(len(ids)) if not start <= i < start + n_image
    ]
    assert len(expect) == 4 + 8 * int(n_image * ratio / 8)


# ------------------------------------------------------------------------- authors' Qwen paths: DivPrune


@pytest.mark.parametrize("family", list(QWEN))
@pytest.mark.parametrize("size,ratio", [((220, 300), 0.25), ((330, 200), 0.3)])  # (h, w)
def test_divprune_matches_the_qwen_port(family, size, ratio):
    model = QWEN[family][0]()
    proc = QWEN[family][1](max_pixels=(9 * 32) ** 2)
    inputs = proc(images=[demo_image(height=size[0], width=size[1], seed=7)], text=[qwen_prompt()], return_tensors="pt")
    feats = port_features(model, inputs["pixel_values"], inputs["image_grid_thw"])
    n = feats.shape[0]
    ours_k = round(ratio * n)  # DivPrune's own count; the port floors (``port_count``): at most one token less
    picks = port_divprune(feats, ours_k)  # the greedy is prefix-consistent: the port's k picks are its first k
    globalcom2.apply(model, "divprune", retention_ratio=ratio)
    (tokens,) = prepare(model, inputs).extras
    assert tokens.index.tolist() == sorted(picks.tolist())
    assert 0 <= ours_k - port_count(ratio, n) <= 1
    assert set(picks[: port_count(ratio, n)].tolist()) <= set(tokens.index.tolist())


def test_divprune_projected_space_differs_and_runs(qwen):
    _, model, proc = qwen
    inputs = qwen_batch(proc)
    globalcom2.apply(model, "divprune", retention_ratio=0.3, space="projected")
    model(**inputs)
    with pytest.raises(ValueError, match="space must be one of"):
        globalcom2.apply(model, "divprune", space="pixels")


# ----------------------------------------------------------------------------------------------- VisionZip


def test_visionzip_dominant_and_contextual_counts(qwen):
    _, model, proc = qwen
    inputs = qwen_batch(proc)
    globalcom2.apply(model, "visionzip", retention_ratio=0.5)
    batch = prepare(model, inputs)
    for rec, n in zip(batch.records, batch.stock_counts):
        k = max(1, round(n * 0.5))
        c = int(round(k * 10 / 64))
        assert rec.num_tokens == k
        assert rec.selection.extra.shape[0] == rec.selection.extra_at.shape[0] == min(c, k - 1)
        assert torch.equal(rec.tokens.index, rec.tokens.index.sort().values)  # stock order
