"""SparseVLM: raters, clustering, schedule and one pruning step on hand-made tensors; end to end on tiny models."""

import pytest
import torch

import globalcom2
from conftest import PROMPT, make_inputs
from globalcom2.methods.base import PruneContext
from globalcom2.methods.sparsevlm import (
    RELEASED,
    SparseVLMConfig,
    cluster_means,
    rater_positions,
    recycled,
    released_totals,
)
from globalcom2.tiny import demo_image, tiny_model

# ---------------------------------------------------------------- hand-made tensors


def test_raters_are_text_after_the_image_above_mean_relevance():
    # pad, 1 text, 2 visual, 3 text tokens; visual embeddings point along x, and so does text token 5
    e = torch.tensor([[9.0, 9], [0, 1], [1, 0], [1, 0], [0, 1], [5, 0], [0, 1]])
    mask = torch.tensor([False] + [True] * 6)
    visual = torch.tensor([False, False, True, True, False, False, False])
    pos = torch.tensor([1, 0, 1, 2, 3, 4, 5])  # left padding, as transformers numbers it
    assert rater_positions(e, mask, visual, pos).tolist() == [4]  # token 1 is before the image and never rates
    # two equally relevant tokens both rate; the one below the mean does not
    e[4] = torch.tensor([5.0, 0])
    assert rater_positions(e, mask, visual, pos).tolist() == [3, 4]
    # no image: the last token stands in
    assert rater_positions(e, mask, torch.zeros(7, dtype=torch.bool), pos).tolist() == [5]


def test_cluster_means_finds_two_blobs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=g) * 0.01 + 5
    b = torch.randn(5, 4, generator=g) * 0.01 - 5
    x = torch.cat([a, b])[torch.randperm(11, generator=g)]
    means = cluster_means(x, 2)
    got = sorted(means.tolist())
    assert torch.allclose(torch.tensor(got), torch.stack([b.mean(0), a.mean(0)]), atol=1e-6)


def test_cluster_means_is_deterministic_on_ties():
    x = torch.tensor([[1.0, 0], [1, 0], [1, 0], [-1, 0], [-1, 0]])  # equal densities within each blob
    means = cluster_means(x, 2)
    assert means.tolist() == cluster_means(x.clone(), 2).tolist()
    assert sorted(means[:, 0].tolist()) == [-1.0, 1.0]
    assert cluster_means(x[:1], 1).tolist() == [[1.0, 0.0]]  # one token, one cluster: itself


def test_schedule_hits_the_average_ratio_and_shrinks():
    for n_visual, num_layers, layers in [(2880, 32, (2, 6, 15)), (576, 32, (2, 6, 15)), (2144, 40, (3, 8, 20))]:
        for ratio in (1.0, 0.75, 0.5, 1 / 3, 0.25, 0.2, 0.1):
            cfg = SparseVLMConfig(retention_ratio=ratio, layers=layers)
            counts = cfg.stage_counts(n_visual, num_layers)
            assert n_visual >= counts[0] >= counts[1] >= counts[2] >= 1
            w = cfg.layer_weights(num_layers)
            assert sum(w) == num_layers
            avg = (w[0] * n_visual + sum(a * b for a, b in zip(w[1:], counts))) / num_layers / n_visual
            assert avg == pytest.approx(cfg.layer_average(counts, n_visual, num_layers))
            # as close as integers allow: the last stage is off by at most half a token
            assert abs(avg - ratio) <= w[-1] / (2 * num_layers * n_visual) + 1e-12, (n_visual, ratio, counts)
    assert SparseVLMConfig(retention_ratio=1.0).stage_counts(2880, 32) == (2880, 2880, 2880)


def test_released_192_schedule_is_reproduced():
    # v1.5 keeps 300/200/110 of 576 tokens and recycles 9/4/3 cluster tokens: stages of 309/204/113
    assert released_totals(RELEASED[192]) == (309, 204, 113)
    cfg = SparseVLMConfig(retention_ratio=192 / 576)
    counts = cfg.stage_counts(576, 32)
    assert counts == (309, 204, 113)
    splits = [cfg.split(cur, c) for cur, c in zip((576, *counts), counts)]
    assert splits == [(300, 9), (200, 4), (110, 3)]
    # their averages over 32 layers are the labels once the recycled tokens are counted
    for label, keep in RELEASED.items():
        assert cfg.layer_average(released_totals(keep), 576, 32) * 576 == pytest.approx(label, abs=1)
    # without recycling, the same stage sizes are all kept tokens
    assert SparseVLMConfig(retention_ratio=192 / 576, recycle=False).split(576, 309) == (309, 0)


def test_split_adds_up():
    cfg = SparseVLMConfig()
    for current in (2, 7, 50, 576, 2880):
        for target in range(1, current + 1, max(1, current // 37)):
            keep, clusters = cfg.split(current, target)
            assert keep + clusters == target
            if target < current and clusters:
                assert clusters == recycled(current - keep)
            else:  # too small to hold the clusters, or nothing to prune
                assert clusters == 0 and (target == current or target < recycled(current))


def test_prune_keeps_top_rated_tokens_and_appends_a_cluster():
    # 2 text, 6 visual, 3 text tokens; the prompt's text token 8 is the only rater
    L, D = 11, 4
    visual = torch.zeros(1, L, dtype=torch.bool)
    visual[0, 2:8] = True
    embeds = torch.zeros(1, L, D)
    embeds[0, 2:8, 0] = 1.0
    embeds[0, 8] = torch.tensor([5.0, 0, 0, 0])
    embeds[0, 9:, 1] = 1.0
    hidden = torch.randn(1, L, D, generator=torch.Generator().manual_seed(0))
    att = torch.tensor([0.0, 0.0, 0.1, 0.5, 0.05, 0.3, 0.02, 0.03, 0.0, 0.0, 0.0])

    def probs(queries):
        assert queries.tolist() == [[8]]
        return att.view(1, 1, 1, L).expand(1, 2, 1, L)  # two heads, same row

    pos = torch.arange(L)[None]
    mask = torch.ones(1, L, dtype=torch.bool)
    cfg = SparseVLMConfig(retention_ratio=0.4, layers=(1, 3, 5))
    assert cfg.stage_counts(6, 8)[0] == 3 and cfg.split(6, 3) == (2, 1)
    ctx = PruneContext(
        layer_idx=2, stage=0, hidden=hidden, key_mask=mask, positions=pos, visual=visual, probs=probs,
        n_visual_full=torch.tensor([6]), prompt=(embeds, mask, visual, pos), num_layers=8,
    )  # fmt: skip
    out = cfg.prune(ctx)
    # kept: the top-2 visual tokens (3, 5) in order; deleted 2, 4, 7, 6 by score; the top int(4 * 0.3) + 1 = 2
    # of them (2, 4) form one cluster, placed after the kept visual tokens at the image's last position (7)
    assert out.positions[0].tolist() == [0, 1, 3, 5, 7, 8, 9, 10]
    assert out.visual[0].tolist() == [False, False, True, True, True, False, False, False]
    assert torch.equal(out.hidden[0][[0, 1, 2, 3, 5, 6, 7]], hidden[0, [0, 1, 3, 5, 8, 9, 10]])
    assert torch.allclose(out.hidden[0][4], hidden[0, [2, 4]].mean(0))
    # recycle=False keeps the top 3 instead
    out = SparseVLMConfig(retention_ratio=0.4, layers=(1, 3, 5), recycle=False).prune(ctx)
    assert out.positions[0].tolist() == [0, 1, 2, 3, 5, 8, 9, 10]


def test_bad_options_and_depth(model):
    with pytest.raises(ValueError, match="layers must be three strictly increasing"):
        SparseVLMConfig(layers=(6, 2, 15))
    with pytest.raises(ValueError, match="layers must be three strictly increasing"):
        SparseVLMConfig(layers=(2, 6))
    with pytest.raises(TypeError, match="recycle must be True or False"):
        SparseVLMConfig(recycle=1)
    with pytest.raises(ValueError, match="retention_ratio must be a finite number in"):
        SparseVLMConfig(retention_ratio=0.0)
    with pytest.raises(ValueError, match=r"layers must all be < 2 for a language model with 3 layers"):
        globalcom2.apply(model, method="sparsevlm")
    deep = tiny_model(text_layers=8)
    with pytest.raises(ValueError, match=r"retention_ratio 0.1 is below .* at least 2/8 = 0.2500"):
        globalcom2.apply(deep, method="sparsevlm", retention_ratio=0.1, layers=(2, 3, 5))
    assert not globalcom2.is_patched(model) and not globalcom2.is_patched(deep)


# ---------------------------------------------------------------- end to end


def _layer_lengths(model):
    """Sequence length each decoder layer processed at the last call (read off its output)."""
    seen = []
    hooks = [
        layer.register_forward_hook(lambda m, a, out, i=i: seen.append((i, out.shape[1])))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    return seen, hooks


def test_visual_tokens_per_layer_follow_the_schedule(processor, images):
    model = tiny_model(text_layers=8)
    cfg = SparseVLMConfig(retention_ratio=0.25, layers=(1, 3, 5))
    globalcom2.apply(model, cfg)
    # one image: layers 0-1 see everything (layer 1's output is pruned), 2-3 stage 1, 4-5 stage 2, 6-7 stage 3
    inputs = make_inputs(processor, [demo_image(300, 220)])
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - n_img
    seen, hooks = _layer_lengths(model)
    with torch.no_grad():
        model(**inputs)
    c = cfg.stage_counts(n_img, 8)
    assert [n for _, n in seen] == [n_img + n_text] * 2 + [c[0] + n_text] * 2 + [c[1] + n_text] * 2 + [
        c[2] + n_text
    ] * 2
    assert cfg.layer_average(c, n_img, 8) == pytest.approx(0.25, abs=3 / (2 * 8 * n_img))
    # a batch of mixed sizes: every row follows its own schedule (the longest row sets the padded length)
    prompts = [PROMPT, "USER: <image>\nhow many dogs are there ? ASSISTANT:", PROMPT]
    batch = make_inputs(processor, images, prompts)
    seen.clear()
    with torch.no_grad():
        model(**batch)
    for h in hooks:
        h.remove()
    n_img = (batch["input_ids"] == model.config.image_token_id).sum(1).tolist()
    n_text = [int(m) - v for m, v in zip(batch["attention_mask"].sum(1), n_img)]
    stages = [(v, *cfg.stage_counts(v, 8)) for v in n_img]
    expect = [max(s[i // 2] + t for s, t in zip(stages, n_text)) for i in range(8)]  # layers 2j, 2j+1: stage j
    assert [n for _, n in seen] == expect


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batch_matches_alone_and_generate(processor, images, attn):
    model = tiny_model(text_layers=8, attn_implementation=attn)
    globalcom2.apply(model, method="sparsevlm", retention_ratio=0.5, layers=(1, 3, 5))
    prompts = [PROMPT, "USER: <image>\nhow many dogs are there ? ASSISTANT:", PROMPT]
    batch = make_inputs(processor, images, prompts)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None)
    n = batch["input_ids"].shape[1]
    assert torch.equal(out[:, :n], batch["input_ids"]) and out.shape[1] == n + 4
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        single = make_inputs(processor, [img], [prompt])
        alone = model.generate(**single, max_new_tokens=4, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], out[i, n:])


def test_eager_and_sdpa_agree(processor, images):
    inputs = make_inputs(processor, images, [PROMPT] * 3)
    outs = []
    for attn in ("eager", "sdpa"):
        model = tiny_model(text_layers=8, attn_implementation=attn)
        globalcom2.apply(model, method="sparsevlm", retention_ratio=0.25, layers=(1, 3, 5))
        outs.append(model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None))
    assert torch.equal(*outs)


def test_bf16_and_remove(processor, images):
    model, twin = tiny_model(text_layers=8, dtype=torch.bfloat16), tiny_model(text_layers=8, dtype=torch.bfloat16)
    inputs = make_inputs(processor, images[:2], [PROMPT, PROMPT])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        twin(**inputs)
        ref = twin(**inputs).logits
        globalcom2.apply(model, method="sparsevlm", retention_ratio=0.25, layers=(1, 3, 5))
        assert model(**inputs).logits.isfinite().all()
        model.generate(**inputs, max_new_tokens=2)
        globalcom2.remove(model)
        assert torch.equal(model(**inputs).logits, ref)
