"""VisionZip, DivPrune, DART and CDPruner (issue 12): oracles from the authors' code, then end to end."""

import pytest
import torch

import globalcom2
from conftest import PROMPT, encode, make_inputs
from globalcom2.methods import ImageContext
from globalcom2.models import llava_next as A
from globalcom2.models import towers
from globalcom2.testing.tiny import demo_image, tiny_model, tiny_processor
from oracles.reference_cdpruner import reference_tokens as cdpruner_reference
from oracles.reference_cdpruner import reference_tokens_unpad as cdpruner_reference_unpad
from oracles.reference_dart import reference_keep as dart_reference
from oracles.reference_divprune import reference_tokens as divprune_reference
from oracles.reference_visionzip import reference_tokens as visionzip_reference


def _visionzip_counts(rec, ratio):
    """(kept tokens per view, tokens beyond them): dominant patches per view; [CLS] + contextual extra."""
    n_views, k = 1 + rec.grid[0] * rec.grid[1], max(1, round(rec.side**2 * ratio))
    dominant = k - round(k * 10 / 64)
    return [dominant - 1] * n_views, n_views * (k - dominant + 1)


def _divprune_counts(rec, ratio):
    """round(R T) of the T stock tokens (thumbnail, unpadded crops, newlines), some of them newlines."""
    kept = rec.kept_per_view().tolist()
    geo_rows = int(rec.valid.view(-1, rec.side, rec.side).any(2).view(rec.grid[0], rec.grid[1], rec.side).any(1).sum())
    stock = rec.side**2 + int(rec.valid.sum()) + geo_rows
    assert rec.num_tokens == round(ratio * stock)
    return kept, rec.num_tokens - sum(kept)


def _cdpruner_counts(rec, ratio):
    """T per view over the padded grid (the branch their code executes), no newlines."""
    t = max(1, round(rec.side**2 * ratio))
    kept = rec.kept_per_view().tolist()
    assert kept == [t] * (1 + rec.grid[0] * rec.grid[1])
    return kept, 0


def _dart_counts(rec, ratio):
    """4 image pivots + 8 TOPK tokens of the stock sequence (4 image + 4 text pivots)."""
    kept = rec.kept_per_view().tolist()
    rows = int(rec.valid.view(-1, rec.side, rec.side).any(2).view(rec.grid[0], rec.grid[1], rec.side).any(1).sum())
    stock = rec.side**2 + int(rec.valid.sum()) + rows
    assert rec.num_tokens == 4 + 8 * (min(round(ratio * stock), stock - 4) // 8)
    return kept, rec.num_tokens - sum(kept)


#: name -> (record, R) -> (kept per view, other tokens), used by test_methods' token-count test
NEW_METHOD_COUNTS = {
    "visionzip": _visionzip_counts,
    "divprune": _divprune_counts,
    "dart": _dart_counts,
    "cdpruner": _cdpruner_counts,
}

CASES = [((300, 220), 0.5), ((150, 400), 0.25), ((500, 120), 0.75), ((224, 224), 0.1), ((90, 300), 1.0)]


def _eager_tower_outputs(model, pixel_values, image_sizes):
    """Feature-layer attention maps, hidden states and head-averaged keys, the way the authors read them."""
    geo = A.Geometry.from_config(model.config)
    grids = [geo.grid(tuple(int(x) for x in s)) for s in image_sizes.tolist()]
    flat = torch.cat([pv[: 1 + g[0] * g[1]] for pv, g in zip(pixel_values, grids)])
    tower = model.model.vision_tower
    tower.config._attn_implementation = "eager"
    layer = model.config.vision_feature_layer
    attn_mod = towers.encoder_layers(tower)[layer].self_attn
    seen = []
    handle = attn_mod.k_proj.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        out = tower(flat, output_hidden_states=True, output_attentions=True, return_dict=True)
    handle.remove()
    keys = seen[0]
    v, t, d = keys.shape
    heads = attn_mod.num_heads if hasattr(attn_mod, "num_heads") else tower.config.num_attention_heads
    metric = keys.view(v, t, heads, d // heads).mean(2)  # their raw_key_states.mean(1)
    return out.attentions[layer][:, :, 0, 1:], out.hidden_states[layer], metric, grids


# ---------------------------------------------------------------- VisionZip


@pytest.mark.parametrize("size,ratio", CASES)
def test_visionzip_matches_authors_code(processor, size, ratio):
    model = tiny_model(seed=3)
    inputs = processor(
        images=demo_image(height=size[1], width=size[0], seed=size[0]), text="<image>", return_tensors="pt"
    )
    cfg = globalcom2.make_config("visionzip", retention_ratio=ratio)
    with torch.no_grad():
        feats, (rec,) = A.compress(model, cfg, inputs["pixel_values"], inputs["image_sizes"])
    attn, hidden, metric, (grid,) = _eager_tower_outputs(model, inputs["pixel_values"], inputs["image_sizes"])
    N = attn.shape[-1]
    k = max(1, round(N * ratio))
    contextual = round(k * 10 / 64)
    ref = visionzip_reference(attn, hidden, metric, k - contextual, contextual, grid)
    with torch.no_grad():
        ref = model.model.multi_modal_projector(ref)
    assert feats[0].shape == ref.shape == (rec.num_tokens, ref.shape[1])
    assert rec.num_tokens == (1 + grid[0] * grid[1]) * k
    torch.testing.assert_close(feats[0], ref, rtol=1e-4, atol=1e-5)


def test_visionzip_split_is_the_authors_54_10():
    from globalcom2.methods.visionzip import visionzip_split

    assert [visionzip_split(k, 10 / 64) for k in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert visionzip_split(1, 10 / 64) == (1, 0)  # [CLS] alone
    assert visionzip_split(8, 0.0) == (8, 0)


def test_visionzip_merge_by_hand():
    from globalcom2.methods.visionzip import merge_contextual

    # 1 view, 4 non-dominant tokens at positions 1..4 of a 5-token sequence, c = 2: step 2 -> targets 0, 2
    hidden = torch.arange(5.0)[None, :, None].expand(1, 5, 3).clone()  # token p has hidden p
    keys = torch.tensor([[[0.0, 1], [1, 0], [1, 0.1], [0, 1], [0.1, 1]]])
    rest = torch.tensor([[1, 2, 3, 4]])
    out = merge_contextual(hidden, keys, rest, 2)  # token 2 joins target 1, token 4 joins target 3
    assert torch.equal(out[0, :, 0], torch.tensor([1.0 + 2.0, 3.0 + 4.0]))


def test_visionzip_kept_mask_shows_dominant_tokens(processor):
    model = tiny_model()
    inputs = processor(images=demo_image(height=220, width=300), text="<image>", return_tensors="pt")
    cfg = globalcom2.make_config("visionzip", retention_ratio=0.5)
    _, (rec,) = A.compress(model, cfg, inputs["pixel_values"], inputs["image_sizes"])
    N = rec.side**2
    k = round(N * 0.5)
    dominant = k - round(k * 10 / 64) - 1
    assert rec.kept_per_view().tolist() == [dominant] * (1 + rec.grid[0] * rec.grid[1])
    assert rec.kept_mask().sum() == dominant * (1 + rec.grid[0] * rec.grid[1])


def test_visionzip_needs_hidden_and_keys():
    cfg = globalcom2.make_config("visionzip")
    ctx = ImageContext(scores=torch.rand(5, 16), side=4, grid=(2, 2), valid=torch.ones(4, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="visionzip needs"):
        cfg.select(ctx)
    with pytest.raises(ValueError, match="contextual_share"):
        globalcom2.make_config("visionzip", contextual_share=1.0)


# ---------------------------------------------------------------- DivPrune


def _stock_tokens(model, inputs):
    """Stock LLaVA-NeXT visual tokens of the first image, packed by transformers itself."""
    feats = A.stock_features(model, inputs["pixel_values"], {"image_sizes": inputs["image_sizes"]})
    return feats[0]


@pytest.mark.parametrize("size,ratio", CASES[:4])
def test_divprune_matches_authors_code(processor, size, ratio):
    model = tiny_model(seed=4)
    inputs = processor(
        images=demo_image(height=size[1], width=size[0], seed=size[1]), text="<image>", return_tensors="pt"
    )
    with torch.no_grad():
        feats, (rec,) = A.compress(model, globalcom2.make_config("divprune", retention_ratio=ratio),
                                   inputs["pixel_values"], inputs["image_sizes"])  # fmt: skip
        stock = _stock_tokens(model, inputs)
    ref = divprune_reference(stock, ratio)
    assert rec.num_tokens == round(ratio * stock.shape[0]) == ref.shape[0]
    assert torch.equal(feats[0], ref)


def test_divprune_greedy_by_hand():
    from globalcom2.methods.divprune import max_min_diverse

    # four directions in the plane: 0 and 1 nearly equal, 2 orthogonal, 3 opposite to 0
    x = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [-1.0, 0.0]])
    # first: the token whose nearest other is farthest (3: nearest 2 at distance 1; 2's nearest is 1 at 0.95),
    # then the farthest from {3} (0, at 2), then the farthest from {3, 0} (2, at 1; 1 is 0.001 from 0)
    assert max_min_diverse(x, 3).tolist() == [3, 0, 2]
    assert sorted(max_min_diverse(x, 4).tolist()) == [0, 1, 2, 3]  # every token once at R = 1
    dup = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]])
    assert sorted(max_min_diverse(dup, 4).tolist()) == [0, 1, 2, 3]  # duplicates: still each token once


def test_divprune_blockwise_distance_is_the_full_one():
    from globalcom2.methods.divprune import cosine_distance

    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(0))
    normed = x / x.norm(dim=1, keepdim=True)
    full = 1.0 - normed @ normed.t()
    blocked = cosine_distance(x, block=7)
    torch.testing.assert_close(blocked, full, rtol=0, atol=1e-6)


def test_divprune_similarity_greedy_equals_the_distance_greedy_and_the_oracle():
    from globalcom2.methods.divprune import cosine_distance, max_min_diverse
    from oracles.reference_divprune import reference_keep

    g = torch.Generator().manual_seed(1)
    for trial in range(12):
        t = int(torch.randint(2, 40, (1,), generator=g))
        x = torch.randn(t, 8, generator=g)
        x[torch.randint(t, (t // 3,), generator=g)] = x[0].clone()  # exact duplicates, like the newline tokens
        dist = cosine_distance(x)
        # the distance-matrix greedy, written out: second smallest of each column, then min to the chosen set
        score, picks = dist.topk(2, dim=0, largest=False).values[1], []
        nearest = torch.full((t,), float("inf"))
        for _ in range(t):
            j = int(score.argmax())
            picks.append(j)
            nearest = torch.minimum(nearest, dist[j])
            nearest[picks] = -float("inf")
            score = nearest
        for k in (1, t // 2, t):
            assert max_min_diverse(x, k).tolist() == picks[:k], (trial, k)
            assert sorted(picks[:k]) == reference_keep(x, k / t), (trial, k)


def test_divprune_per_view(processor):
    model = tiny_model()
    inputs = processor(images=demo_image(height=220, width=300), text="<image>", return_tensors="pt")
    cfg = globalcom2.make_config("divprune", retention_ratio=0.25, granularity="view")
    _, (rec,) = A.compress(model, cfg, inputs["pixel_values"], inputs["image_sizes"])
    n_valid = [rec.side**2] + rec.valid.sum(1).tolist()
    assert rec.kept_per_view().tolist() == [max(1, round(0.25 * c)) if c else 0 for c in n_valid]
    assert rec.num_tokens == rec.kept_per_view().sum()  # no newline tokens
    assert not (rec.kept_mask()[1:] & ~rec.valid).any()  # nothing from the letterbox padding
    with pytest.raises(ValueError, match=r"granularity must be one of \('image', 'view'\)"):
        globalcom2.make_config("divprune", granularity="crop")


# ---------------------------------------------------------------- CDPruner


@pytest.mark.parametrize("size,ratio", [((300, 220), 0.25), ((150, 400), 0.1), ((500, 120), 0.4)])
@pytest.mark.parametrize("unpad", [False, True])
def test_cdpruner_matches_authors_code(processor, size, ratio, unpad):
    """The default is the branch their code executes (``spatial``: no unpadding, no newlines); ``unpad=True`` the
    ``spatial_unpad`` branch their ``replace('_unpad', '')`` switches off."""
    model = tiny_model(seed=5)
    inputs = processor(
        images=demo_image(height=size[1], width=size[0], seed=size[0] + 1), text=PROMPT, return_tensors="pt"
    )
    options = {"unpad": True} if unpad else {}
    with torch.no_grad():
        feats, (rec,) = A.compress(
            model, globalcom2.make_config("cdpruner", retention_ratio=ratio, **options), inputs["pixel_values"],
            inputs["image_sizes"], input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        )  # fmt: skip
        views, _, sizes = encode(model, inputs["pixel_values"], inputs["image_sizes"])
        ids = inputs["input_ids"][0]
        text = model.get_input_embeddings()(ids[ids != model.config.image_token_id])
    N = views[0].shape[1]
    t = max(1, round(N * ratio))
    if unpad:
        ref = cdpruner_reference_unpad(views[0], text, rec.grid, sizes[0], t, model.model.image_newline)
    else:
        ref = cdpruner_reference(views[0], text, rec.grid, t)
        assert ref.shape[0] == (1 + rec.grid[0] * rec.grid[1]) * t  # all T picks of every view
    assert feats[0].shape == ref.shape
    torch.testing.assert_close(feats[0], ref.to(feats[0].dtype), rtol=0, atol=0)


def test_dpp_greedy_by_hand():
    from globalcom2.methods.cdpruner import dpp_greedy

    # 0 and 1 nearly parallel and both large; 2 orthogonal and smaller: greedy MAP takes 0, then 2, not 1
    x = torch.tensor([[2.0, 0.0], [1.9, 0.2], [0.0, 1.0]])
    kernel = (x @ x.t())[None]
    assert dpp_greedy(kernel, 2).tolist() == [[0, 2]]
    assert dpp_greedy(kernel.expand(3, 3, 3), 3).tolist() == [[0, 1, 2]] * 3  # batched, everything at T = N


def test_dpp_greedy_picks_distinct_tokens_past_the_kernel_rank():
    from globalcom2.methods.cdpruner import dpp_greedy

    x = torch.randn(2, 40, 3, generator=torch.Generator().manual_seed(0))  # rank 3, 40 tokens
    chosen = dpp_greedy(x @ x.transpose(1, 2), 30)
    assert all(len(set(row)) == 30 for row in chosen.tolist())


def test_cdpruner_uses_the_instruction(processor):
    model = tiny_model()
    cfg = globalcom2.make_config("cdpruner", retention_ratio=0.25)
    recs = []
    for prompt in ("USER: <image>\nwhat is this ? ASSISTANT:", "USER: <image>\nred car left sign ? ASSISTANT:"):
        inputs = processor(images=demo_image(height=220, width=300), text=prompt, return_tensors="pt")
        pv, sizes = inputs["pixel_values"], inputs["image_sizes"]
        recs.append(A.compress(model, cfg, pv, sizes, input_ids=inputs["input_ids"])[1][0])
    only_image = processor(
        images=demo_image(height=220, width=300), text="<image>", return_tensors="pt"
    )  # no text: plain DPP
    plain = A.compress(model, cfg, pv, sizes, input_ids=only_image["input_ids"])[1][0]
    masks = [r.kept_mask() for r in (*recs, plain)]
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    with pytest.raises(
        ValueError, match=r"method 'cdpruner' ranks visual tokens against the prompt's text: pass input_ids"
    ):
        A.compress(model, cfg, pv, sizes)  # a prompt-reading method never runs without its prompt
    with pytest.raises(ValueError, match=r"text_pooling must be one of \('mean', 'tokens'\)"):
        globalcom2.make_config("cdpruner", text_pooling="max")


# ---------------------------------------------------------------- DART (embedding level)


@pytest.mark.parametrize("size,ratio", CASES[:4])
def test_dart_matches_the_authors_algorithm_on_embeddings(processor, size, ratio):
    model = tiny_model(seed=6)
    inputs = processor(
        images=demo_image(height=size[1], width=size[0], seed=size[0] + 2), text=PROMPT, return_tensors="pt"
    )
    with torch.no_grad():
        feats, (rec,) = A.compress(
            model, globalcom2.make_config("dart", retention_ratio=ratio, form="embedding"), inputs["pixel_values"],
            inputs["image_sizes"], input_ids=inputs["input_ids"],
        )  # fmt: skip
        stock = _stock_tokens(model, inputs)
        ids = inputs["input_ids"][0]
        text = model.get_input_embeddings()(ids[ids != model.config.image_token_id])
    keep = dart_reference(stock, text, ratio)
    assert torch.equal(feats[0], stock[keep])
    T = stock.shape[0]
    assert len(keep) == 4 + 8 * (min(round(ratio * T), T - 4) // 8)  # their count: retain, +4 - remainder


def test_dart_by_hand_keeps_pivots_and_least_duplicated():
    from globalcom2.methods.dart import duplication_aware_keep

    # token 0 is the largest (the pivot); 1 duplicates it, 2 and 3 point elsewhere
    x = torch.tensor([[3.0, 0.0], [2.0, 0.1], [0.0, 1.0], [-1.0, 0.2]])
    assert duplication_aware_keep(x, None, 2, 1, 0).tolist() == [0, 2, 3]  # pivot + TOPK = 2
    assert duplication_aware_keep(x, None, 1, 1, 0).tolist() == [0, 3]  # the most different first
    # TOPK = 1 per pivot: the image pivot takes 3, a text pivot along x takes the free token least like it, 2
    text = torch.tensor([[1.0, 0.0]])
    assert duplication_aware_keep(x, text, 2, 1, 1).tolist() == [0, 2, 3]
    with pytest.raises(ValueError, match="pivot_image_tokens must be >= 1"):
        globalcom2.make_config("dart", pivot_image_tokens=0)
    with pytest.raises(TypeError, match="pivot_text_tokens must be an int"):
        globalcom2.make_config("dart", pivot_text_tokens=2.5)


NEW = ["visionzip", "divprune", "dart", "cdpruner"]


@pytest.mark.parametrize("name", NEW)
def test_new_methods_eager_and_sdpa_agree(processor, images, name):
    inputs = make_inputs(processor, images, [PROMPT] * 3)
    outs = []
    for attn in ("eager", "sdpa"):
        model = tiny_model(attn_implementation=attn)
        globalcom2.apply(model, method=name, retention_ratio=0.25)
        outs.append(model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None))
    assert torch.equal(*outs)


# ---------------------------------------------------------------- tools accept the new names


def test_viz_draws_new_methods(processor):
    from globalcom2.tools import viz

    model = tiny_model()
    panels = viz.panels(model, processor, demo_image(height=220, width=300), methods=tuple(NEW), ratios=(0.25,))
    for panel in panels:
        assert panel.kept_patch_counts() == panel.record.kept_per_view().tolist()
    fig = viz.render(model, processor, demo_image(height=220, width=300), methods=["visionzip"], ratios=[0.25])
    assert "merged/[CLS] not drawn" in fig.axes[0].get_ylabel()


def test_bench_runs_new_methods(capsys):
    from globalcom2.tools import bench

    argv = ["--tiny", "--repeats", "1", "--decode-tokens", "1", "--methods", *NEW, "--ratios", "0.25", "--quiet"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in NEW)


@pytest.mark.parametrize("name", NEW)
def test_flops_token_count_matches_the_adapter(name):
    from globalcom2.tools import flops

    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    model = tiny_model(image_size=336, patch_size=14, pinpoints=pins, vision_layers=2)
    processor = tiny_processor(image_size=336, patch_size=14, pinpoints=pins)
    inputs = processor(images=demo_image(height=672, width=672), text=PROMPT, return_tensors="pt")
    geo = A.Geometry.from_config(model.config)
    for ratio in (0.25, 0.1):
        cfg = globalcom2.make_config(name, retention_ratio=ratio, **({"form": "embedding"} if name == "dart" else {}))
        with torch.no_grad():
            pv, sizes = inputs["pixel_values"], inputs["image_sizes"]
            _, (rec,) = A.compress(model, cfg, pv, sizes, input_ids=inputs["input_ids"])
        count = flops.visual_tokens(name, ratio, (672, 672), geometry=geo)
        assert count.kept == rec.num_tokens  # no padding at 672x672: exact for every method


@pytest.mark.parametrize("name", ["divprune"])  # dart keeps 4 + 8 (T - 4) // 8 of T by its authors' count
def test_stock_sequence_methods_keep_everything_at_ratio_one_even_for_images_thinner_than_a_token(processor, name):
    """At R = 1 DivPrune hands the LLM stock's visual tokens exactly, newline rows of
    images so thin that no column survives unpadding included (stock still ends each row)."""
    import numpy as np
    from PIL import Image

    model = tiny_model(seed=6)
    for width, height in [(8, 900), (300, 220), (900, 8)]:
        img = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
        inputs = make_inputs(processor, [img])
        with torch.no_grad():
            feats, (rec,) = A.compress(
                model, globalcom2.make_config(name, retention_ratio=1.0), inputs["pixel_values"],
                inputs["image_sizes"], input_ids=inputs["input_ids"],
            )  # fmt: skip
            stock = _stock_tokens(model, inputs)
        assert torch.equal(feats[0], stock), (name, width, height)


def test_divprune_unpad_rounding_follows_transformers_or_their_truncation(processor):
    """Their ``unpad_image`` truncates where transformers rounds: rare sizes differ by whole rows (352x110 px at
    336 px views: 1360 stock tokens, 1262 in their code); ``unpad_rounding="authors"`` takes theirs."""
    from globalcom2.tools.flops import llava_next_config

    config = llava_next_config()
    assert globalcom2.budget.stock_image_tokens(config, (110, 352)) == 1360
    counts = {
        r: globalcom2.num_image_tokens(config, (110, 352), "divprune", retention_ratio=1.0, unpad_rounding=r)
        for r in ("transformers", "authors")
    }
    assert counts == {"transformers": 1360, "authors": 1262}
    model = tiny_model()  # 112 px views: a 376 x 47 px image is such a size
    inputs = processor(images=demo_image(height=47, width=376), text="<image>", return_tensors="pt")
    for rounding, rows in (("transformers", 4), ("authors", 2)):
        cfg = globalcom2.make_config("divprune", retention_ratio=1.0, unpad_rounding=rounding)
        feats, (rec,) = A.compress(model, cfg, inputs["pixel_values"], inputs["image_sizes"])
        assert feats[0].shape[0] == 64 + rows * (24 + 1) == globalcom2.num_image_tokens(model, (47, 376), cfg)
    with pytest.raises(ValueError, match="unpad_rounding must be one of"):
        globalcom2.make_config("divprune", unpad_rounding="round")
