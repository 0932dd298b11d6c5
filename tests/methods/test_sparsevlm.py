"""SparseVLM: raters, clustering, schedule and one pruning step on hand-made tensors; end to end on tiny models."""

import random

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
from globalcom2.testing.tiny import demo_image, tiny_model
from oracles.reference_sparsevlm import TABLES, prune_stage, raters

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
    # no image, or no text after it: no raters (the pruning step lets the row's last token rate)
    assert rater_positions(e, mask, torch.zeros(7, dtype=torch.bool), pos).tolist() == []
    assert rater_positions(e, mask, torch.tensor([False] * 5 + [True] * 2), pos).tolist() == []


def test_cluster_means_finds_two_blobs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=g) * 0.01 + 5
    b = torch.randn(5, 4, generator=g) * 0.01 - 5
    x = torch.cat([a, b])[torch.randperm(11, generator=g)]
    means = cluster_means(x, 2)
    got = sorted(means.tolist())
    # v1.5 divides a cluster's sum by (members + 1e-6)
    assert torch.allclose(torch.tensor(got), torch.stack([b.sum(0) / (5 + 1e-6), a.sum(0) / (6 + 1e-6)]), atol=1e-6)


def test_cluster_means_is_deterministic_on_ties():
    x = torch.tensor([[1.0, 0], [1, 0], [1, 0], [-1, 0], [-1, 0]])  # equal densities within each blob
    means = cluster_means(x, 2)
    assert means.tolist() == cluster_means(x.clone(), 2).tolist()
    assert torch.allclose(means[:, 0].sort().values, torch.tensor([-1.0, 1.0]), atol=1e-5)
    assert torch.allclose(cluster_means(x[:1], 1), x[:1], atol=1e-5)  # one token, one cluster: itself


def test_v15_schedule_keeps_the_tables_originals_and_recycles_on_top():
    cfg = SparseVLMConfig(retention_ratio=192 / 576)
    assert cfg.counting == "v15"
    # v1.5 keeps 300/200/110 of 576 tokens and adds 9/4/3 cluster tokens on top: stages of 309/204/113
    for label, keep in RELEASED.items():
        plan = SparseVLMConfig(retention_ratio=label / 576).plan(576, 32)
        assert [k for k, _ in plan] == list(keep)
        assert SparseVLMConfig(retention_ratio=label / 576).stage_counts(576, 32) == released_totals(keep)
        # their averages over 32 layers are the labels once the recycled tokens are counted (v1.5's own print)
        assert cfg.layer_average(released_totals(keep), 576, 32) * 576 == pytest.approx(label, abs=1)
    assert cfg.plan(576, 32) == ((300, 9), (200, 4), (110, 3))
    # any other image size: the same shares of original tokens, clusters by v1.5's rule on top
    assert cfg.plan(2880, 32) == ((1500, 42), (1000, 17), (550, 15))
    assert recycled(2880 - 1500) == 42 and recycled(1542 - 1000) == 17
    # without recycling the kept counts stay, nothing is added
    assert SparseVLMConfig(retention_ratio=192 / 576, recycle=False).plan(576, 32) == ((300, 0), (200, 0), (110, 0))


def test_v15_schedule_interpolates_and_always_deletes_one():
    for n_visual in (1, 2, 5, 576, 2880):
        for ratio in (1e-6, 0.01, 0.1, 64 / 576, 0.2, 0.25, 1 / 3, 0.5, 0.75, 0.999):
            cfg = SparseVLMConfig(retention_ratio=ratio)
            current = n_visual
            for kept, clusters in cfg.plan(n_visual, 32):
                if current <= 1:
                    assert (kept, clusters) == (current, 0)  # nothing left to rank
                else:  # v1.5: topk(min(K, v - 1)): at least one token goes, clusters come on top
                    assert 1 <= kept <= current - 1 and clusters == recycled(current - kept)
                current = kept + clusters
    # halfway between the 192 anchor (R = 1/3) and keep-all (R = 1), the kept shares are halfway too
    mid = SparseVLMConfig(retention_ratio=2 / 3).kept_fractions()
    assert mid == pytest.approx(((300 / 576 + 1) / 2, (200 / 576 + 1) / 2, (110 / 576 + 1) / 2))
    # the layer average stays close to R between the released labels (32 layers, default layers)
    for ratio in (0.15, 0.25, 0.4, 0.6, 0.9):
        cfg = SparseVLMConfig(retention_ratio=ratio)
        for n_visual in (576, 2880):
            assert cfg.layer_average(cfg.stage_counts(n_visual, 32), n_visual, 32) == pytest.approx(ratio, abs=0.01)
    # R = 1 leaves every row alone (v1.5 would still swap one token for a one-member cluster)
    assert SparseVLMConfig(retention_ratio=1.0).plan(2880, 32) == ((2880, 0),) * 3


def test_inclusive_schedule_hits_the_average_ratio_and_shrinks():
    for n_visual, num_layers, layers in [(2880, 32, (2, 6, 15)), (576, 32, (2, 6, 15)), (2144, 40, (3, 8, 20))]:
        for ratio in (1.0, 0.75, 0.5, 1 / 3, 0.25, 0.2, 0.1):
            cfg = SparseVLMConfig(retention_ratio=ratio, layers=layers, counting="inclusive")
            sizes = cfg.stage_sizes(n_visual, num_layers)
            assert cfg.stage_counts(n_visual, num_layers) == sizes  # the recycled tokens are counted inside
            assert n_visual >= sizes[0] >= sizes[1] >= sizes[2] >= 1
            w = cfg.layer_weights(num_layers)
            assert sum(w) == num_layers
            avg = cfg.layer_average(sizes, n_visual, num_layers)
            assert abs(avg - ratio) <= sum(w[1:]) / (2 * num_layers * n_visual) + 1e-12, (n_visual, ratio, sizes)
    assert SparseVLMConfig(retention_ratio=1.0, counting="inclusive").stage_counts(2880, 32) == (2880,) * 3
    # at the 192 table's own layer average the stage sizes are the table: 291 kept + 9 clusters = 300, ...
    cfg = SparseVLMConfig(retention_ratio=(2 * 576 + 4 * 300 + 9 * 200 + 17 * 110) / (32 * 576), counting="inclusive")
    assert cfg.stage_counts(576, 32) == (300, 200, 110)
    assert cfg.plan(576, 32) == ((291, 9), (196, 4), (107, 3))


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


def _hand_made_ctx(L=11, D=4):
    """2 text, 6 visual, 3 text tokens; the prompt's text token 8 is the only rater."""
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
    return PruneContext(
        layer_idx=2, stage=0, hidden=hidden, key_mask=mask, positions=pos, visual=visual, probs=probs,
        n_visual_full=torch.tensor([6]), prompt=(embeds, mask, visual, pos), num_layers=8,
    )  # fmt: skip


def test_prune_keeps_top_rated_tokens_and_appends_a_cluster():
    ctx, hidden = _hand_made_ctx(), _hand_made_ctx().hidden
    # v15: R = 0.4 keeps floor(6 * 0.569 + 1/2) = 3 originals (3, 5, 2) and recycles the best of the
    # other three (4) as a one-member cluster after them, at the image's last position (7)
    cfg = SparseVLMConfig(retention_ratio=0.4, layers=(1, 3, 5))
    assert cfg.step(6, 0, 6, 8) == (3, 1)
    out = cfg.prune(ctx)
    assert out.positions[0].tolist() == [0, 1, 2, 3, 5, 7, 8, 9, 10]
    assert out.visual[0].tolist() == [False, False, True, True, True, True, False, False, False]
    assert torch.equal(out.hidden[0][[0, 1, 2, 3, 4, 6, 7, 8]], hidden[0, [0, 1, 2, 3, 5, 8, 9, 10]])
    assert torch.allclose(out.hidden[0][5], hidden[0, 4] / (1 + 1e-6))
    # inclusive: a stage of 3 = 2 kept (3, 5) + one cluster of the top int(4 * 0.3) + 1 = 2 deleted (2, 4)
    cfg = SparseVLMConfig(retention_ratio=0.4, layers=(1, 3, 5), counting="inclusive")
    assert cfg.stage_sizes(6, 8)[0] == 3 and cfg.step(6, 0, 6, 8) == (2, 1)
    out = cfg.prune(ctx)
    assert out.positions[0].tolist() == [0, 1, 3, 5, 7, 8, 9, 10]
    assert out.visual[0].tolist() == [False, False, True, True, True, False, False, False]
    assert torch.equal(out.hidden[0][[0, 1, 2, 3, 5, 6, 7]], hidden[0, [0, 1, 3, 5, 8, 9, 10]])
    assert torch.allclose(out.hidden[0][4], hidden[0, [2, 4]].sum(0) / (2 + 1e-6))
    # recycle=False keeps the top 3 and adds nothing
    out = SparseVLMConfig(retention_ratio=0.4, layers=(1, 3, 5), recycle=False).prune(ctx)
    assert out.positions[0].tolist() == [0, 1, 2, 3, 5, 8, 9, 10]


# ---------------------------------------------------------------- oracle: the released v1.5 code


@pytest.mark.parametrize("label", [192, 128, 64])
def test_matches_released_v15_at_its_576_token_schedules(label):
    """Three pruning layers on hand-made hidden states and attention, library vs a literal v1.5 oracle."""
    g = torch.Generator().manual_seed(label)
    v_start, n_img, n_text, D, H = 35, 576, 40, 16, 2
    L = v_start + n_img + n_text
    embeds = torch.randn(1, L, D, generator=g)
    visual = torch.zeros(1, L, dtype=torch.bool)
    visual[0, v_start : v_start + n_img] = True
    pos0 = torch.arange(L)[None]
    rater_idx = raters(embeds, v_start, n_img)
    assert 0 < rater_idx.numel() < n_text
    cfg = SparseVLMConfig(retention_ratio=label / 576)  # counting="v15", layers 2/6/15 on a 32-layer LLM
    seq, v_num = embeds, n_img  # the oracle's sequence
    hidden, positions, vis = embeds[0], pos0[0], visual[0]  # the library's
    for stage, keep in enumerate(TABLES[label]):
        length = seq.shape[1]
        assert hidden.shape[0] == length and int(vis.sum()) == v_num
        layer_out = seq + 0.5 * torch.randn(seq.shape, generator=g)  # the pruning layer's output, (1, L_s, D)
        logits = torch.randn(1, H, length, length, generator=g) * 3
        attn = logits.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf")).softmax(-1)

        seq, v_new, kept_idx, merged = prune_stage(attn, layer_out, v_start, v_num, rater_idx, keep)
        ctx = PruneContext(
            layer_idx=(2, 6, 15)[stage] + 1, stage=stage, hidden=layer_out, key_mask=torch.ones(1, length, dtype=bool),
            positions=positions[None], visual=vis[None], probs=lambda q, a=attn: a[:, :, q[0], :],
            n_visual_full=torch.tensor([n_img]), prompt=(embeds, torch.ones(1, L, dtype=bool), visual, pos0),
            num_layers=32,
        )  # fmt: skip
        out = cfg.prune(ctx)
        hidden, positions, vis = out.hidden[0], out.positions[0], out.visual[0]
        # same counts: the table's originals, clusters on top
        assert int(vis.sum()) == v_new == keep + recycled(v_num - keep)
        n_kept = keep
        # same kept tokens, in the same order, and the same text
        assert torch.equal(hidden[: v_start + n_kept], seq[0, : v_start + n_kept])
        assert torch.equal(hidden[v_start + v_new :], seq[0, v_start + v_new :])
        assert torch.equal(hidden[v_start : v_start + n_kept], layer_out[0, v_start + kept_idx])
        # same recycled tokens (density ties, systematic with two clusters, broken the library's way: see the oracle)
        assert torch.allclose(hidden[v_start + n_kept : v_start + v_new], merged, atol=1e-5)
        v_num = v_new
    assert v_num == released_totals(TABLES[label])[-1]


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
    with pytest.raises(ValueError, match=r"counting must be one of \('v15', 'inclusive'\), got 'v1.0'"):
        SparseVLMConfig(counting="v1.0")
    deep = tiny_model(text_layers=8)
    with pytest.raises(ValueError, match=r"retention_ratio 0.1 is below .* at least 2/8 = 0.2500"):
        globalcom2.apply(deep, method="sparsevlm", retention_ratio=0.1, layers=(2, 3, 5), counting="inclusive")
    assert not globalcom2.is_patched(model) and not globalcom2.is_patched(deep)
    # v15's R is the released label's share, not a layer average: any R in (0, 1] runs
    globalcom2.apply(deep, method="sparsevlm", retention_ratio=0.1, layers=(2, 3, 5))
    assert globalcom2.is_patched(deep)


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
    cfg = SparseVLMConfig(retention_ratio=0.25, layers=(1, 3, 5), counting="inclusive")
    globalcom2.apply(model, cfg)
    # one image: layers 0-1 see everything (layer 1's output is pruned), 2-3 stage 1, 4-5 stage 2, 6-7 stage 3
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - n_img
    seen, hooks = _layer_lengths(model)
    with torch.no_grad():
        model(**inputs)
    c = cfg.stage_counts(n_img, 8)
    assert [n for _, n in seen] == [n_img + n_text] * 2 + [c[0] + n_text] * 2 + [c[1] + n_text] * 2 + [
        c[2] + n_text
    ] * 2
    assert cfg.layer_average(c, n_img, 8) == pytest.approx(0.25, abs=7 / (2 * 8 * n_img))  # weights 1, 2, 2, 3
    # a batch of mixed sizes, default counting: every row follows its own schedule (the longest row sets the length)
    globalcom2.remove(model)
    cfg = SparseVLMConfig(retention_ratio=0.25, layers=(1, 3, 5))
    globalcom2.apply(model, cfg)
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


# ---------------------------------------------------------------- odd input (issue 13): never crash, batch == alone

NO_TEXT_AFTER = "USER: describe this : <image>"


def _generate(model, inputs, **kw):
    with torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None, **kw)
    assert logits.isfinite().all()
    return out[:, inputs["input_ids"].shape[1] :]


def _check_batch_equals_alone(model, processor, cases):
    """cases: (images of the row, prompt); a batch of all rows gives each row's greedy tokens alone."""
    imgs = [im for row_imgs, _ in cases for im in row_imgs]
    batch = processor(
        images=imgs or None,
        text=[p for _, p in cases],
        return_tensors="pt",
        input_data_format="channels_last",
        padding=True,
    )
    together = _generate(model, batch)
    for i, (row_imgs, prompt) in enumerate(cases):
        alone = _generate(
            model,
            processor(images=row_imgs or None, text=[prompt], return_tensors="pt", input_data_format="channels_last"),
        )
        assert torch.equal(alone[0], together[i]), (i, prompt)


@pytest.mark.parametrize("ratio", [1.0, 0.25])
def test_no_text_after_the_image_lets_the_last_token_rate(processor, images, ratio):
    model, stock = tiny_model(text_layers=8), tiny_model(text_layers=8)
    globalcom2.apply(model, method="sparsevlm", retention_ratio=ratio, layers=(1, 3, 5))
    inputs = processor(images=images[:1], text=[NO_TEXT_AFTER], return_tensors="pt", input_data_format="channels_last")
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - n_img
    seen, hooks = _layer_lengths(model)
    got = _generate(model, inputs)
    for h in hooks:
        h.remove()
    c = SparseVLMConfig(retention_ratio=ratio, layers=(1, 3, 5)).stage_counts(n_img, 8)
    assert [n for _, n in seen[:8]] == [n_img + n_text] * 2 + [x + n_text for x in c for _ in range(2)]
    if ratio == 1.0:  # nothing pruned: the stock model's tokens
        assert torch.equal(got, _generate(stock, inputs))
    else:  # a real ranking, not an all-zero one: the last token's attention picks the kept tokens
        assert c[0] < n_img
    _check_batch_equals_alone(model, processor, [(images[:1], NO_TEXT_AFTER), (images[1:2], PROMPT)])


@pytest.mark.parametrize("ratio", [1e-6, 0.3])
def test_rows_with_few_or_no_visual_tokens(processor, images, ratio):
    from PIL import Image

    model = tiny_model(text_layers=8)
    globalcom2.apply(model, method="sparsevlm", retention_ratio=ratio, layers=(1, 3, 5))
    thin, dot = Image.new("RGB", (1000, 3), (200, 30, 30)), Image.new("RGB", (1, 1), (0, 200, 0))
    cases = [
        ([], "USER: hello there ASSISTANT:"),  # a text-only row in an image batch
        ([thin], PROMPT),
        ([dot], PROMPT),
        ([images[0], images[2]], "USER: <image> and <image>\nwhich is larger ? ASSISTANT:"),  # two images
        ([images[1]], NO_TEXT_AFTER),
    ]
    _check_batch_equals_alone(model, processor, cases)
    # beams expand each row; the odd rows still decode
    batch = processor(
        images=[thin, images[1]],
        text=[PROMPT, NO_TEXT_AFTER],
        return_tensors="pt",
        input_data_format="channels_last",
        padding=True,
    )
    assert _generate(model, batch, num_beams=2).shape == (2, 3)


def test_plan_never_grows_and_never_exceeds_stock():
    """Random draws (seeded) of token counts, ratios, depths and options: the schedule's invariants hold."""
    rng = random.Random(0)
    for _ in range(400):
        n_visual, num_layers = rng.choice([0, 1, 2, 3, rng.randint(4, 6000)]), rng.randint(4, 48)
        ratio = rng.choice([1e-6, 1.0, 10 ** rng.uniform(-6, 0)])
        counting, recycle = rng.choice(["v15", "inclusive"]), rng.random() < 0.7
        layers = (1, 2, 3) if num_layers < 16 else (2, 6, 15)
        cfg = SparseVLMConfig(retention_ratio=ratio, counting=counting, recycle=recycle, layers=layers)
        current = n_visual
        for kept, clusters in cfg.plan(n_visual, num_layers):
            assert 0 <= kept <= current and clusters >= 0
            assert kept + clusters <= current  # a stage never adds visual tokens: never more than stock
            assert recycle or clusters == 0
            assert kept + clusters >= 1 or n_visual == 0  # a row with visual tokens keeps at least one
            current = kept + clusters
        if ratio == 1.0:
            assert cfg.stage_counts(n_visual, num_layers) == (n_visual,) * 3
