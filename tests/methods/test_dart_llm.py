"""DART's in-LLM form (issue 12): the authors' pivots by layer K-1 key norm, pruned before layer K.

Oracle: ``tests/reference_dart.py::reference_llm_keep``, written from their ``get_retained_image_token``.
The registry-wide tests (tests/test_methods.py, tests/test_properties.py) run ``dart`` too: batch ==
alone, eager/SDPA, fp32/bf16, generate, remove() bit-exact.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import globalcom2
from conftest import PROMPT, make_inputs
from globalcom2.methods.base import PruneContext
from globalcom2.methods.dart import DARTConfig, set_order
from globalcom2.testing.tiny import demo_image, tiny_model
from oracles.reference_dart import reference_llm_keep

LONG = "USER: <image>\nwhat is shown in this picture , in detail ? ASSISTANT:"


def _hand_made(seed, n_before, n_image, n_after, heads=2, hd=4, d=6, pad=0):
    """One row of hand-made layer K-1 keys (L, H hd), states (L, D), optionally left-padded by ``pad``."""
    g = torch.Generator().manual_seed(seed)
    length = n_before + n_image + n_after
    keys = torch.randn(length, heads * hd, generator=g)
    states = torch.randn(length, d, generator=g)
    visual = torch.zeros(length, dtype=torch.bool)
    visual[n_before : n_before + n_image] = True
    return keys, states, visual


def _ctx(rows, heads=2, hd=4):
    """A PruneContext over left-padded rows of (keys, states, visual); identity norm, positions from 0."""
    n = max(k.shape[0] for k, _, _ in rows)
    b, d = len(rows), rows[0][1].shape[1]
    keys = torch.zeros(b, n, heads * hd)
    hidden = torch.zeros(b, n, d)
    visual = torch.zeros(b, n, dtype=torch.bool)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for r, (k, s, v) in enumerate(rows):
        keys[r, n - k.shape[0] :], hidden[r, n - k.shape[0] :], visual[r, n - k.shape[0] :] = k, s, v
        mask[r, n - k.shape[0] :] = True
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    return PruneContext(
        layer_idx=2, stage=0, hidden=hidden, key_mask=mask, positions=positions, visual=visual,
        probs=lambda q: pytest.fail("DART reads keys, not attention"), n_visual_full=visual.sum(1),
        keys=lambda: keys.view(b, n, heads, hd).transpose(1, 2), norm=lambda x: x,
    )  # fmt: skip


@pytest.mark.parametrize(
    "seed,n_before,n_image,n_after,ratio",
    [(0, 5, 40, 12, 0.5), (1, 3, 64, 6, 0.25), (2, 35, 100, 20, 0.1), (3, 2, 30, 9, 1.0), (4, 7, 57, 4, 0.75)],
)
def test_prune_matches_the_authors_code_on_hand_made_tensors(seed, n_before, n_image, n_after, ratio):
    keys, states, visual = _hand_made(seed, n_before, n_image, n_after)
    out = DARTConfig(retention_ratio=ratio).prune(_ctx([(keys, states, visual)]))
    retain = round(ratio * n_image)
    expect = reference_llm_keep(keys, states, n_before, n_image, retain)
    kept = out.positions[0]
    assert kept[out.visual[0]].tolist() == expect
    text = [i for i in range(len(visual)) if not visual[i]]
    assert sorted(kept[~out.visual[0]].tolist()) == text  # every text token stays
    assert torch.equal(out.hidden[0], states[kept])  # kept rows, unchanged, at their positions
    assert len(expect) == 4 + 8 * (min(retain, n_image - 4) // 8)


def test_pivot_order_is_the_python_set_order_of_their_positions():
    positions = [700, 36, 1500, 37, 2900, 2950, 2960, 2970]
    assert [positions[i] for i in set_order(positions)] == list(set(positions))
    assert set_order([3, 1, 2]) == [1, 2, 0]


def test_prune_of_a_padded_batch_equals_each_row_alone():
    rows = [_hand_made(10, 4, 50, 9), _hand_made(11, 6, 23, 5), _hand_made(12, 2, 31, 2)]
    cfg = DARTConfig(retention_ratio=0.3)
    batch = cfg.prune(_ctx(rows))
    for r, row in enumerate(rows):
        alone = cfg.prune(_ctx([row]))
        assert torch.equal(batch.positions[r], alone.positions[0])
        assert torch.equal(batch.hidden[r], alone.hidden[0])


def test_few_text_tokens_and_no_visual_tokens():
    # two text tokens after the image: both are pivots and TOPK divides by the 6 pivots found
    keys, states, visual = _hand_made(5, 3, 40, 2)
    out = DARTConfig(retention_ratio=0.5).prune(_ctx([(keys, states, visual)]))
    assert int(out.visual[0].sum()) == 4 + 6 * (min(20, 36) // 6)
    # no text after the image: image pivots alone
    keys, states, visual = _hand_made(6, 3, 40, 0)
    out = DARTConfig(retention_ratio=0.5).prune(_ctx([(keys, states, visual)]))
    assert int(out.visual[0].sum()) == 4 + 4 * (20 // 4)
    # a text-only row passes through
    keys, states, visual = _hand_made(7, 9, 0, 0)
    out = DARTConfig(retention_ratio=0.5).prune(_ctx([(keys, states, visual)]))
    assert out.positions[0].tolist() == list(range(9))


def _authors_inputs(model, inputs, k):
    """Their ``any_states`` and ``last_layer_state`` for one prompt, from the stock model's hidden states."""
    lm = model.model.language_model
    with torch.no_grad():
        hs = model(**inputs, output_hidden_states=True).hidden_states  # hs[i]: input of layer i
        layer = lm.layers[k - 1]
        attn = layer.self_attn
        x = layer.input_layernorm(hs[k - 1])
        b, length, _ = x.shape
        pos = torch.arange(length)[None]
        cos, sin = lm.rotary_emb(x, pos)
        q = attn.q_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
        key = attn.k_proj(x).view(b, length, -1, attn.head_dim).transpose(1, 2)
        _, key = apply_rotary_pos_emb(q, key, cos, sin)
        key = repeat_kv(key, attn.num_key_value_groups)  # (1, H, L, hd), as their attention returns it
        any_states = key.permute(0, 2, 1, 3).reshape(b, length, -1)[0]
        return any_states, lm.norm(hs[k])[0]


@pytest.mark.parametrize("size,ratio,k", [((300, 220), 0.25, 2), ((150, 400), 0.5, 2), ((500, 120), 0.1, 1)])
def test_end_to_end_matches_the_authors_code(processor, size, ratio, k):
    model = tiny_model(seed=3, text_layers=4)
    inputs = make_inputs(processor, [demo_image(height=size[1], width=size[0], seed=size[0])], [LONG])
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id).squeeze(1)
    start, n_image = int(image[0]), image.numel()
    any_states, last_state = _authors_inputs(model, inputs, k)
    expect = reference_llm_keep(any_states, last_state, start, n_image, round(ratio * n_image))
    globalcom2.apply(model, "dart", retention_ratio=ratio, k=k)
    seen = []
    hook = model.model.language_model.layers[k].register_forward_hook(
        lambda m, a, kw, o: seen.append(kw["position_ids"].clone()), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    kept = seen[0][0].tolist()
    assert [p for p in kept if start <= p < start + n_image] == expect
    assert [p for p in kept if not start <= p < start + n_image] == [
        i for i in range(len(ids)) if not start <= i < start + n_image
    ]


def test_layer_lengths_and_generate(processor):
    model = tiny_model(text_layers=4)
    inputs = make_inputs(processor, [demo_image(height=220, width=300)], [LONG])
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - n_img
    globalcom2.apply(model, "dart", retention_ratio=0.25)
    lengths = []
    handles = [layer.register_forward_hook(lambda m, a, o: lengths.append(o.shape[1])) for layer in
               model.model.language_model.layers]  # fmt: skip
    with torch.no_grad():
        model(**inputs)
    kept = 4 + 8 * (min(round(0.25 * n_img), n_img - 4) // 8)
    assert lengths == [n_img + n_text] * 2 + [kept + n_text] * 2
    lengths.clear()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    for h in handles:
        h.remove()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    assert lengths[: len(model.model.language_model.layers)] == [n_img + n_text] * 2 + [kept + n_text] * 2


def test_form_picks_where_and_the_embedding_form_still_selects(processor):
    llm = globalcom2.make_config("dart")
    emb = globalcom2.make_config("dart", form="embedding")
    assert (llm.form, llm.where, emb.where) == ("llm", "llm", "vision")
    assert globalcom2.make_config(emb, retention_ratio=0.5).where == "vision"
    assert globalcom2.make_config(llm, form="embedding").where == "vision"
    with pytest.raises(ValueError, match=r"form must be one of \('llm', 'embedding'\), got 'vision'"):
        globalcom2.make_config("dart", form="vision")
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        globalcom2.make_config("dart", k=0)
    with pytest.raises(TypeError, match="prunes inside the language model, where budget does not apply"):
        globalcom2.make_config("dart", budget="exact")
    assert globalcom2.make_config("dart", form="embedding", budget="exact").where == "vision"  # a no-op there
    assert not hasattr(llm, "select")  # the in-LLM form is an LLMMethod: it has no vision-side selection
    assert type(emb).__name__ == "DARTEmbeddingConfig" and type(llm).__name__ == "DARTConfig"
    model = tiny_model()
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\]"):
        globalcom2.apply(model, "dart", k=3)
    assert not globalcom2.is_patched(model)
    globalcom2.apply(model, "dart", k=3, form="embedding")  # k is the in-LLM form's; the embedding form ignores it
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    assert seen[0] < inputs["input_ids"].shape[1]  # shortened before the language model


def test_num_image_tokens_refuses_the_in_llm_form_and_names_the_embedding_form():
    from globalcom2.testing.tiny import tiny_config

    with pytest.raises(ValueError, match=r"prunes inside the language model.*form='embedding'"):
        globalcom2.num_image_tokens(tiny_config(), (300, 220), method="dart")
    # the embedding form's count is 4 + 8 TOPK whenever the prompt has >= pivot_text_tokens text tokens
    stock = globalcom2.num_image_tokens(tiny_config(), (300, 220), "uniform", retention_ratio=1.0, layout="spatial")
    topk = min(round(0.25 * stock), stock - 4) // 8
    got = globalcom2.num_image_tokens(tiny_config(), (300, 220), method="dart", form="embedding", retention_ratio=0.25)
    assert got == 4 + 8 * topk


def test_vllm_plugin_refuses_the_in_llm_form_and_names_the_embedding_form():
    from globalcom2.integrations.vllm import method_config
    from globalcom2.testing.tiny import tiny_config

    cfg = tiny_config()
    cfg.globalcom2 = {"method": "dart"}
    with pytest.raises(ValueError, match=r"inside the language model.*form='embedding'"):
        method_config(cfg)


def test_eager_and_sdpa_agree(processor, images):
    inputs = make_inputs(processor, images, [PROMPT, LONG, PROMPT])
    outs = []
    for attn in ("eager", "sdpa"):
        model = tiny_model(attn_implementation=attn)
        globalcom2.apply(model, method="dart", retention_ratio=0.25)
        outs.append(model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None))
    assert torch.equal(*outs)


def test_flops_count_the_in_llm_form_layer_by_layer(capsys):
    from globalcom2.tools import flops

    shape = flops.PRESETS["llava-next-7b"]
    kept = 4 + 8 * (min(round(0.25 * 2928), 2924) // 8)
    assert flops.layer_visual_tokens("dart", 0.25, 2928, 32) == [2928] * 2 + [kept] * 30
    assert flops.layer_visual_tokens("dart", 0.25, 2928, 32, k=5) == [2928] * 5 + [kept] * 27
    assert flops.layer_visual_tokens("fastv", 0.5, 2928, 32) == [2928] * 2 + [1464] * 30
    assert flops.layer_visual_tokens("dart", 0.25, 768, 32, form="embedding") == [768] * 32  # its input
    assert flops.layer_visual_tokens("globalcom2", 0.25, 768, 32) == [768] * 32
    sv = globalcom2.make_config("sparsevlm", retention_ratio=0.25)
    s0, s1, s2 = sv.stage_counts(2928, 32)
    assert flops.layer_visual_tokens("sparsevlm", 0.25, 2928, 32) == [2928] * 3 + [s0] * 4 + [s1] * 9 + [s2] * 16
    one = flops.LMShape(**{**shape.__dict__, "num_layers": 1})
    expect = 2 * flops.prefill_flops(one, 2928) + 30 * flops.prefill_flops(one, kept)
    assert flops.method_prefill_flops(shape, "dart", 0.25, 2928) == pytest.approx(expect)
    assert flops.method_prefill_flops(shape, "globalcom2", 0.25, 768) == pytest.approx(flops.prefill_flops(shape, 768))
    assert flops.main(["--image-size", "672", "672", "--methods", "dart", "fastv", "--ratios", "0.25"]) == 0
    out = capsys.readouterr().out
    assert f"dart R=0.25  stock 2928 -> {kept}; prefill {expect / 1e12:.2f} TFLOPs" in out


def test_bench_measures_the_in_llm_form_and_takes_method_options(tmp_path):
    import json

    from globalcom2.tools import bench

    base = ["--tiny", "--repeats", "1", "--decode-tokens", "1", "--methods", "dart", "--ratios", "0.25", "--quiet"]
    rows = []
    for options in ("{}", '{"dart": {"k": 1}}'):
        assert bench.main([*base, "--options", options, "--json", str(tmp_path / "b.json")]) == 0
        rows.append(json.loads((tmp_path / "b.json").read_text())[1])
    # the in-LLM form: every stock visual token in layers < K, fewer after; k=1 prunes one layer earlier
    assert rows[1]["visual_tokens"] < rows[0]["visual_tokens"]
    assert rows[1]["kv_mb"] < rows[0]["kv_mb"]
    with pytest.raises(SystemExit):
        bench.main([*base, "--options", '["dart"]'])
