"""Every registered method: hand-made scores with a known answer, then end to end on tiny models."""

import math

import pytest
import torch
from test_newer_methods import NEW_METHOD_COUNTS
from transformers import LlavaNextForConditionalGeneration

import globalcom2
from conftest import PROMPT, make_inputs
from globalcom2 import core
from globalcom2.methods import REGISTRY, ImageContext
from globalcom2.methods.base import PruneContext
from globalcom2.models import llava_next as A
from globalcom2.testing.tiny import demo_image, tiny_model

VISION = sorted(n for n, c in REGISTRY.items() if c.where == "vision")
IN_LLM = sorted(n for n, c in REGISTRY.items() if c.where == "llm")
# SparseVLM prunes after three layers: give it a deeper tiny model
DEEP = {"sparsevlm": ({"text_layers": 8}, {"layers": (1, 3, 5)})}


def _model_and_options(name, **model_kwargs):
    extra_model, options = DEEP.get(name, ({}, {}))
    return tiny_model(**model_kwargs, **extra_model), options


def _ctx(n_crops=4, side=4, seed=0, valid=None):
    """A 2x2-crop image with hand-made scores: the thumbnail's top-left quarter dominates."""
    g = torch.Generator().manual_seed(seed)
    N = side * side
    scores = torch.rand(1 + n_crops, N, generator=g)
    thumb = scores[0].view(side, side)
    thumb[: side // 2, : side // 2] += 10.0  # region of crop 0
    valid = torch.ones(n_crops, N, dtype=torch.bool) if valid is None else valid
    return ImageContext(scores=scores, side=side, grid=(2, 2), valid=valid)


# ---------------------------------------------------------------- registry and options


def test_registry_names_descriptions_and_kinds():
    methods = globalcom2.available_methods()
    expected = {
        "globalcom2", "fastervlm", "fastv", "random", "thumbnail_only", "crops_only", "drop_random_crop",
        "drop_important_crop", "drop_unimportant_crop", "uniform", "ntopk", "softmax_max", "softmax_sum",
        "local_only", "global_only", "global_local", "sparsevlm",
    }  # fmt: skip
    assert expected <= set(methods)
    assert all(isinstance(d, str) and d for d in methods.values())
    assert all(REGISTRY[n].where in ("vision", "llm") for n in methods)


def test_options_that_belong_to_another_method_are_refused(model):
    with pytest.raises(TypeError, match=r"method 'fastervlm' does not take option\(s\) alpha; valid options: "):
        globalcom2.apply(model, method="fastervlm", alpha=0.5)
    with pytest.raises(TypeError, match=r"method 'uniform' does not take option\(s\) allocation"):
        globalcom2.apply(model, method="uniform", allocation="ntopk")
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\] for a language model with 3 layers"):
        globalcom2.apply(model, method="fastv", k=3)
    assert type(model) is LlavaNextForConditionalGeneration


def test_pinned_variants_equal_globalcom2_with_that_choice():
    ctx = _ctx()
    for name, field, value in [("uniform", "allocation", "uniform"), ("local_only", "importance", "local_only")]:
        a = globalcom2.make_config(name, retention_ratio=0.5).select(ctx)
        b = globalcom2.make_config("globalcom2", retention_ratio=0.5, **{field: value}).select(ctx)
        assert torch.equal(a.crop_keep, b.crop_keep) and torch.equal(a.crop_ratios, b.crop_ratios)
    d = globalcom2.make_config("globalcom2", retention_ratio=0.5).select(ctx)
    for name in ("softmax_sum", "global_local"):
        s = globalcom2.make_config(name, retention_ratio=0.5).select(ctx)
        assert torch.equal(s.crop_keep, d.crop_keep) and torch.equal(s.thumb_keep, d.thumb_keep)


# ---------------------------------------------------------------- hand-made scores, known answers


def test_allocations_table_iv():
    ctx = _ctx()
    r = 0.25
    alloc = lambda a: globalcom2.make_config("globalcom2", retention_ratio=r, allocation=a).crop_ratios(ctx)
    assert torch.equal(alloc("uniform"), torch.full((4,), r, dtype=torch.float64))
    # every one of the thumbnail's top-4 tokens lies over crop 0 -> it gets R * n, the others 0
    assert alloc("ntopk").tolist() == [1.0, 0.0, 0.0, 0.0]
    sums = core.crop_region_stats(ctx.thumbnail, 4, (2, 2), "sum")
    assert torch.equal(alloc("softmax_sum"), core.softmax_retention(sums, r, 10.0))
    maxes = ctx.thumbnail.view(4, 4).unfold(0, 2, 2).unfold(1, 2, 2).amax((-1, -2)).flatten().double()
    assert torch.equal(alloc("softmax_max"), core.softmax_retention(maxes, r, 10.0))
    assert alloc("softmax_sum")[0] == alloc("softmax_sum").max()


def test_importance_table_v_local_and_global():
    side = 4
    ctx = _ctx()
    ctx.scores[1:] = torch.arange(16.0).repeat(4, 1)  # locally, the last tokens of each crop win
    local = globalcom2.make_config("local_only", retention_ratio=0.25, allocation="uniform").select(ctx)
    assert (local.crop_keep[:, -4:]).all() and local.crop_keep.sum() == 16
    glob = globalcom2.make_config("global_only", retention_ratio=0.25, allocation="uniform").select(ctx)
    g = core.global_crop_scores(ctx.thumbnail, ctx.valid, (2, 2), side)
    expected = torch.zeros_like(glob.crop_keep)
    expected.scatter_(1, g.topk(4, dim=1).indices, True)
    assert torch.equal(glob.crop_keep, expected)


def test_fastervlm_keeps_round_NR_per_view_in_raster_order():
    ctx = _ctx()
    cfg = globalcom2.make_config("fastervlm", retention_ratio=0.1)  # round(16 * 0.1) = 2 per view
    sel = cfg.select(ctx)
    assert sel.thumb_keep.numel() == 2 and sel.crop_keep.sum(1).tolist() == [2, 2, 2, 2]
    for j in range(4):
        assert torch.equal(
            sel.crop_keep[j].nonzero().flatten().sort().values, ctx.crops[j].topk(2).indices.sort().values
        )
    order = cfg.order(sel, ctx)
    N = 16
    assert order[:2].tolist() == sorted(sel.thumb_keep.tolist())  # raster, not score order
    assert (order < 5 * N).all()  # no newline tokens
    assert order.numel() == 10
    assert globalcom2.make_config("fastervlm", retention_ratio=0.01).view_budget(torch.tensor(16)) == 1


def test_fastervlm_unpad_applies_R_to_unpadded_tokens():
    valid = core.box_mask((1, 7, 0, 8), (2, 2), 4)  # 12 valid tokens per crop
    ctx = _ctx(valid=valid)
    sel = globalcom2.make_config("fastervlm", retention_ratio=0.5, unpad=True).select(ctx)
    assert sel.crop_keep.sum(1).tolist() == [6, 6, 6, 6]
    assert not (sel.crop_keep & ~valid).any()


def test_table_i_view_variants():
    ctx = _ctx()
    important = 0  # crop 0 holds the thumbnail's hot quarter
    sums = core.crop_region_stats(ctx.thumbnail, 4, (2, 2), "sum")
    unimportant = int(sums.argmin())
    sel = lambda name: globalcom2.make_config(name).select(ctx)  # default R = 1: whole views
    assert sel("thumbnail_only").crop_keep.sum() == 0 and sel("thumbnail_only").thumb_keep.numel() == 16
    assert sel("crops_only").thumb_keep.numel() == 0 and sel("crops_only").crop_keep.all()
    assert sel("drop_important_crop").crop_keep.sum(1).tolist()[important] == 0
    assert sel("drop_unimportant_crop").crop_keep.sum(1).tolist()[unimportant] == 0
    assert sel("drop_random_crop").crop_keep.sum() == 3 * 16
    assert torch.equal(sel("drop_random_crop").crop_keep, sel("drop_random_crop").crop_keep)  # seeded
    other_seed = [
        globalcom2.make_config("drop_random_crop", seed=s).select(ctx).crop_keep.sum(1).argmin() for s in range(8)
    ]
    assert len(set(int(x) for x in other_seed)) > 1
    cfg = globalcom2.make_config("thumbnail_only")
    assert cfg.order(sel("thumbnail_only"), ctx).tolist() == list(range(16))  # no crop rows, no newlines


def test_random_uses_globalcom2_budgets_and_is_seeded():
    ctx = _ctx()
    a = globalcom2.make_config("random", retention_ratio=0.5).select(ctx)
    b = globalcom2.make_config("random", retention_ratio=0.5).select(ctx)
    c = globalcom2.make_config("random", retention_ratio=0.5, seed=1).select(ctx)
    g = globalcom2.make_config("globalcom2", retention_ratio=0.5).select(ctx)
    assert torch.equal(a.crop_keep, b.crop_keep) and not torch.equal(a.crop_keep, c.crop_keep)
    assert torch.equal(a.crop_keep.sum(1), g.crop_keep.sum(1)) and a.thumb_keep.numel() == g.thumb_keep.numel()


def test_fastv_prune_keeps_text_and_top_attended_image_tokens():
    # one row: 2 text, 6 image, 2 text tokens; layer K-1's attention from the last token is known
    L, D = 10, 4
    visual = torch.zeros(1, L, dtype=torch.bool)
    visual[0, 2:8] = True
    att = torch.tensor([0.0, 0.0, 0.1, 0.5, 0.05, 0.3, 0.02, 0.03, 0.0, 0.0])
    hidden = torch.arange(L * D, dtype=torch.float32).view(1, L, D)

    def probs(queries):
        assert queries.tolist() == [[L - 1]]
        return att.view(1, 1, 1, L).expand(1, 2, 1, L)  # two heads, same row

    ctx = PruneContext(
        layer_idx=2, stage=0, hidden=hidden, key_mask=torch.ones(1, L, dtype=torch.bool),
        positions=torch.arange(L)[None], visual=visual, probs=probs, n_visual_full=torch.tensor([6]),
    )  # fmt: skip
    out = globalcom2.make_config("fastv", retention_ratio=0.5).prune(ctx)  # int(6 * 0.5) = 3
    kept = out.positions[0].tolist()
    assert kept == [0, 1, 2, 3, 5, 8, 9]  # top-3 image tokens (3, 5, 2) kept in original order
    assert torch.equal(out.hidden[0], hidden[0, kept])
    assert out.visual[0].sum() == 3


# ---------------------------------------------------------------- end to end


def _lm_lengths(model):
    """Sequence length each decoder layer processed (read off its output)."""
    seen = []
    handles = [
        layer.register_forward_hook(lambda mod, a, out, i=i: seen.append((i, out.shape[1])))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    return seen, handles


@pytest.mark.parametrize("name", VISION)
def test_vision_methods_token_count_matches_formula(processor, name):
    model = tiny_model()
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    cfg = globalcom2.make_config(name, retention_ratio=0.5)
    _, (rec,) = A.compress(model, cfg, inputs["pixel_values"], inputs["image_sizes"], input_ids=inputs["input_ids"])
    N, n = rec.side**2, rec.grid[0] * rec.grid[1]
    kept = rec.kept_per_view()
    valid = rec.valid.sum(1)
    ratios = rec.selection.crop_ratios
    if name in NEW_METHOD_COUNTS:  # issue-12 methods: their own formulas, see tests/test_new_methods.py
        expected_views, newlines = NEW_METHOD_COUNTS[name](rec, 0.5)
    elif name == "fastervlm":
        per_view = max(1, round(N * 0.5))
        expected_views, newlines = [per_view] * (1 + n), 0
    elif name in ("thumbnail_only", "crops_only") or name.startswith("drop_"):
        expected_views = [0 if name == "crops_only" else int(N * 0.5)] + core.count_kept(valid, ratios).tolist()
        newlines = 0 if name == "thumbnail_only" else int(rec.valid.view(n, rec.side, rec.side).any(2).view(
            rec.grid[0], rec.grid[1], rec.side).any(1).sum())  # fmt: skip
    else:  # GlobalCom² family and random: int(N R) + sum int(N_j r_j) + a newline per padded-grid row
        expected_views = [int(N * 0.5)] + core.count_kept(valid, ratios).tolist()
        newlines = rec.grid[0] * rec.side
    assert kept.tolist() == expected_views
    assert rec.num_tokens == sum(expected_views) + newlines
    # the language model receives exactly that many visual tokens
    globalcom2.apply(model, cfg)
    seen, handles = _lm_lengths(model)
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    n_text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    assert {length for _, length in seen} == {n_text + rec.num_tokens}


def test_fastv_token_count_per_layer(processor):
    model = tiny_model(text_layers=4)
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - n_img
    globalcom2.apply(model, method="fastv", retention_ratio=0.25, k=2)
    seen, handles = _lm_lengths(model)
    with torch.no_grad():
        out = model(**inputs)
    for h in handles:
        h.remove()
    kept = math.floor(n_img * 0.25)
    assert [length for _, length in seen] == [n_img + n_text] * 2 + [kept + n_text] * 2
    assert out.logits.shape[1] == kept + n_text


@pytest.mark.parametrize("name", VISION + IN_LLM)
def test_every_method_batch_of_mixed_sizes_matches_alone(processor, images, name):
    model, options = _model_and_options(name)
    prompts = [PROMPT, "USER: <image>\nhow many ? ASSISTANT:", "USER: <image>\ndescribe the picture please ASSISTANT:"]
    globalcom2.apply(model, method=name, retention_ratio=0.5, **options)
    batch = make_inputs(processor, images, prompts)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None)
    n_prompt = batch["input_ids"].shape[1]
    assert torch.equal(out[:, :n_prompt], batch["input_ids"])
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        single = make_inputs(processor, [img], [prompt])
        alone = model.generate(**single, max_new_tokens=4, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], out[i, n_prompt:]), (name, i)


@pytest.mark.parametrize("name", VISION + IN_LLM)
def test_every_method_eager_bf16_and_remove(processor, images, name):
    model, options = _model_and_options(name, attn_implementation="eager", dtype=torch.bfloat16)
    twin, _ = _model_and_options(name, attn_implementation="eager", dtype=torch.bfloat16)
    inputs = make_inputs(processor, images[:2], [PROMPT, PROMPT])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        twin(**inputs)
        ref = twin(**inputs).logits
        globalcom2.apply(model, method=name, retention_ratio=0.25, **options)
        out = model(**inputs)
        assert out.logits.dtype == torch.bfloat16 and out.logits.isfinite().all()
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        globalcom2.remove(model)
        assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("name", ["globalcom2", "fastervlm", "fastv"])
def test_eager_and_sdpa_agree(processor, images, name):
    inputs = make_inputs(processor, images, [PROMPT] * 3)
    outs = []
    for attn in ("eager", "sdpa"):
        model = tiny_model(attn_implementation=attn)
        globalcom2.apply(model, method=name, retention_ratio=0.25)
        outs.append(model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None))
    assert torch.equal(*outs)


def test_fastv_generate_without_cache_matches_with_cache_first_token(processor):
    model = tiny_model()
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    globalcom2.apply(model, method="fastv", retention_ratio=0.25, k=1)
    a = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    b = model.generate(**inputs, max_new_tokens=1, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["globalcom2", "fastv"])
def test_beam_search_and_multiple_returns(processor, images, name):
    model = tiny_model()
    globalcom2.apply(model, method=name, retention_ratio=0.25)
    batch = make_inputs(processor, images[:2], [PROMPT, PROMPT])
    out = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2, do_sample=False)
    n_prompt = batch["input_ids"].shape[1]
    assert out.shape[0] == 4
    assert torch.equal(out[:, :n_prompt], batch["input_ids"].repeat_interleave(2, dim=0))
