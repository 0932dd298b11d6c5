"""LLaVA-OneVision: the adapter end to end on tiny random models (SigLIP tower, Qwen2 LM) built from configs here."""

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlavaOnevisionForConditionalGeneration

import globalcom2
from conftest import lm_inputs
from globalcom2 import core
from globalcom2.methods import REGISTRY
from globalcom2.models import adapter_for
from globalcom2.models import llava_onevision as O
from globalcom2.testing.tiny import demo_image
from globalcom2.testing.tiny_onevision import tiny_onevision_config, tiny_onevision_model, tiny_onevision_processor

PROMPT = "<image>\nwhat is this ?"
NEUTRAL = dict(retention_ratio=1.0, allocation="uniform", thumbnail_order="spatial")
#: (width, height): no downscale, downscaled (3x4 and 6x6 grids), extreme aspect ratios, a 1x1 grid
SIZES = [(300, 220), (150, 400), (500, 500), (500, 120), (60, 500), (1000, 40), (40, 1000), (90, 90), (517, 434)]


@pytest.fixture(scope="module")
def processor():
    return tiny_onevision_processor()


@pytest.fixture
def model():
    return tiny_onevision_model(seed=0)


def inputs_for(processor, images, prompts=None):
    prompts = prompts or [PROMPT] * len(images)
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def image_kwargs(inputs):
    return {"image_sizes": inputs["image_sizes"], "batch_num_images": inputs.get("batch_num_images")}


# ---------------------------------------------------------------- geometry and counts


def test_stock_counts_equal_the_processor_and_the_model(model, processor):
    geo = O.Geometry.from_config(model.config)
    for w, h in SIZES:
        inputs = inputs_for(processor, [demo_image(height=h, width=w)])
        placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
        stock = O.stock_features(model, inputs["pixel_values"], image_kwargs(inputs))
        assert geo.stock_tokens((h, w)) == placeholders == stock[0].shape[0], (w, h)


def test_real_checkpoint_geometry_counts_like_its_processor():
    """llava-onevision-qwen2-*-ov-hf: 384 px views of 14 px patches (27 x 27, not a multiple), 36 pinpoints."""
    from transformers import LlavaOnevisionConfig

    from globalcom2.testing.tiny_onevision import pil_image_processor_class

    config = LlavaOnevisionConfig()
    geo = O.Geometry.from_config(config)
    assert (geo.side, geo.max_views, len(geo.pinpoints)) == (27, 9, 36)
    proc = type(tiny_onevision_processor())(
        image_processor=pil_image_processor_class()(), tokenizer=tiny_onevision_processor().tokenizer,
        num_image_tokens=729, vision_feature_select_strategy="full",
    )  # fmt: skip
    rng = random.Random(1)
    sizes = [(480, 640), (1080, 1920), (1000, 4000), (4000, 300), (384, 384), (10, 3000)]
    sizes += [(rng.randint(10, 4000), rng.randint(10, 4000)) for _ in range(40)]
    for h, w in sizes:
        assert geo.stock_tokens((h, w)) == proc._get_number_of_features(h, w, 384, 384), (h, w)
        n = globalcom2.num_image_tokens(config, (h, w), retention_ratio=0.25, budget="exact")
        assert n < geo.stock_tokens((h, w))


def test_slots_keep_raster_order_inside_each_crop():
    s, bands = 7, 6
    for start, length, emitted in [(0, 42, 21), (3, 36, 30), (0, 42, 42), (5, 30, 30), (0, 35, 17), (1, 40, 39)]:
        slots = O._slots(start, length, emitted, s, bands)
        centre = start + (torch.arange(emitted, dtype=torch.float64) + 0.5) * length / emitted
        assert torch.equal(slots // s, (centre // s).long())  # each token sits in the crop holding its centre
        assert bool((slots[1:] > slots[:-1]).all())  # raster order kept
        if emitted == length:
            assert torch.equal(slots, start + torch.arange(emitted))  # no downscale: true positions


def test_downscale_selects_on_the_emitted_grid_with_pooled_scores(model, processor):
    """A 6x6-grid image: the crop map is bilinearly downscaled; scores are pooled the same way and every
    emitted token is one candidate, in the crop holding its centre."""
    inputs = inputs_for(processor, [demo_image(height=500, width=500)])
    geo = O.Geometry.from_config(model.config)
    lay = geo.layout((500, 500))
    assert lay.downscaled and lay.emitted == (21, 21) and lay.grid == (6, 6)
    cfg = globalcom2.make_config("globalcom2", retention_ratio=0.3, budget="exact")
    enc = O.encode_views(model, cfg, inputs["pixel_values"], image_kwargs(inputs))
    feats, scores = enc.features, enc.scores
    views, vscores = O.virtual_views(feats[0], scores[0], lay, geo.side)
    valid = O._valid(lay, geo.side)
    assert int(valid.sum()) == 21 * 21
    # pooled scores: the stitched crop score map resized like the features
    s, n = geo.side, 36
    score_map = core.crops_to_grid(scores[0][1:], (6, 6), s)[None, None]  # (1, 1, 42, 42)
    pooled = F.interpolate(score_map, [21, 21], mode="bilinear")[0, 0]
    slotted = core.crops_to_grid(vscores[1:], (6, 6), s)[lay.rows[:, None], lay.cols[None, :]]  # (21, 21)
    assert torch.equal(slotted, pooled)
    feature_map = core.crops_to_grid(feats[0][1:], (6, 6), s).permute(2, 0, 1)[None]  # (1, D, 42, 42)
    emitted = F.interpolate(feature_map, [21, 21], mode="bilinear")[0].permute(1, 2, 0)  # (21, 21, D)
    assert torch.equal(core.crops_to_grid(views[1:], (6, 6), s)[lay.rows[:, None], lay.cols[None, :]], emitted)
    # N_j: emitted rows i have centres 2 i + 1 in the 42-row grid, so crop rows hold 3, 4, 3, 4, 3, 4 of them
    _, recs = O.compress(model, cfg, inputs["pixel_values"], **image_kwargs(inputs))
    n_j = valid.sum(1)
    assert torch.equal(
        n_j, torch.tensor([[3, 4, 3, 4, 3, 4][r] * [3, 4, 3, 4, 3, 4][c] for r in range(6) for c in range(6)])
    )
    assert recs[0].selection.crop_keep.shape == (n, s * s) and not bool((recs[0].selection.crop_keep & ~valid).any())


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.25, 0.1, 0.03])
def test_counts_follow_the_documented_formula(model, processor, ratio):
    """budget="exact": K = int(N R) + round(R sum N_j) + h' (h' newlines), what num_image_tokens predicts."""
    geo = O.Geometry.from_config(model.config)
    n_tok = geo.side**2
    cfg = globalcom2.make_config("globalcom2", retention_ratio=ratio, budget="exact")
    for w, h in SIZES:
        inputs = inputs_for(processor, [demo_image(height=h, width=w)])
        feats, _ = O.compress(model, cfg, inputs["pixel_values"], **image_kwargs(inputs))
        eh, ew = geo.layout((h, w)).emitted
        formula = int(core.count_kept(n_tok, ratio)) + core.exact_total(torch.tensor(eh * ew), ratio) + eh
        predicted = globalcom2.num_image_tokens(model.config, (h, w), retention_ratio=ratio, budget="exact")
        assert feats[0].shape[0] == predicted == formula, (w, h, ratio)
        assert globalcom2.num_image_tokens(model, (h, w), "fastervlm", retention_ratio=ratio, unpad=True) == (
            O.compress(model, globalcom2.make_config("fastervlm", retention_ratio=ratio, unpad=True),
                       inputs["pixel_values"], **image_kwargs(inputs))[0][0].shape[0]
        )  # fmt: skip


def test_geometry_is_read_from_config():
    pins = [[56, 56], [56, 112], [112, 56], [112, 112], [168, 168]]
    model = tiny_onevision_model(image_size=56, patch_size=14, pinpoints=pins, vision_aspect_ratio="anyres_max_2")
    processor = tiny_onevision_processor(
        image_size=56, patch_size=14, pinpoints=pins, vision_aspect_ratio="anyres_max_2"
    )
    geo = O.Geometry.from_config(model.config)
    assert (geo.side, geo.max_views) == (4, 2)
    for w, h in [(200, 200), (90, 200), (300, 120)]:
        inputs = inputs_for(processor, [demo_image(height=h, width=w)])
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == geo.stock_tokens((h, w))
        _assert_neutral_equals_stock(model, inputs)


# ---------------------------------------------------------------- R = 1 equals stock, batch == alone


def _assert_neutral_equals_stock(model, inputs, method="globalcom2", **options):
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        stock = model(**inputs).logits
    globalcom2.apply(model, method, **(options or NEUTRAL))
    with torch.no_grad():
        ours = model(**inputs).logits
    globalcom2.remove(model)
    handle.remove()
    assert torch.equal(seen[0][0], seen[1][0])  # the language model's input, bit for bit
    assert torch.equal(seen[0][1], seen[1][1])
    # rows without padding: the same logits bit for bit; padded rows differ only in rotary offsets (stock counts
    # positions from the first pad, the patched model from the first real token, as generate does)
    full = inputs["attention_mask"].bool().all(1)
    assert bool(full.any()) and torch.equal(stock[full], ours[full])
    if stock.dtype == torch.float32:
        real = inputs["attention_mask"].bool()
        assert torch.allclose(stock[real], ours[real], atol=1e-3)  # stock itself moves 1e-4 with these positions


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ratio_one_with_neutral_options_is_stock(processor, attn, dtype):
    model = tiny_onevision_model(attn_implementation=attn, dtype=dtype)
    imgs = [demo_image(height=h, width=w, seed=i) for i, (w, h) in enumerate([(500, 500), (300, 220), (60, 500)])]
    inputs = inputs_for(processor, imgs)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    _assert_neutral_equals_stock(model, inputs)


@pytest.mark.parametrize(
    "method,options",
    [
        ("fastervlm", dict(retention_ratio=1.0, unpad=True)),
        ("divprune", dict(retention_ratio=1.0)),
        ("uniform", dict(retention_ratio=1.0, thumbnail_order="spatial", scorer="attention_received")),
        ("crops_only", dict(retention_ratio=1.0)),
    ],
)
def test_other_methods_at_ratio_one_are_stock(model, processor, method, options):
    inputs = inputs_for(processor, [demo_image(height=434, width=517), demo_image(height=400, width=150, seed=2)])
    if method == "crops_only":  # no thumbnail: stock's crop tokens and newlines alone
        cfg = globalcom2.make_config(method, **options)
        feats, _ = O.compress(model, cfg, inputs["pixel_values"], **image_kwargs(inputs))
        stock = O.stock_features(model, inputs["pixel_values"], image_kwargs(inputs))
        n_tok = O.Geometry.from_config(model.config).side ** 2
        for f, s in zip(feats, stock):
            assert torch.equal(f, s[n_tok:])
        return
    _assert_neutral_equals_stock(model, inputs, method, **options)


def test_call_time_feature_layer_is_honoured(model, processor):
    """vision_feature_layer=-2 at call time: the features of that layer, as stock takes them."""
    inputs = inputs_for(processor, [demo_image(height=220, width=300)])
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        model(**inputs, vision_feature_layer=-2)
        globalcom2.apply(model, **NEUTRAL)
        model(**inputs, vision_feature_layer=-2)
        model(**inputs)
    handle.remove()
    assert torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[1][0], seen[2][0])
    with pytest.raises(ValueError, match="vision_feature_layer must be an int in"):
        model(**inputs, vision_feature_layer=7)


def test_multi_image_prompts_use_single_views(model, processor):
    """A sample with several images: each is its base view + one newline (stock), R of the view kept."""
    imgs = [
        [demo_image(height=220, width=300, seed=1), demo_image(height=400, width=150, seed=2)],
        [demo_image(height=120, width=500, seed=3)],
    ]
    prompts = ["<image><image>\nwhat is this ?", PROMPT]
    inputs = inputs_for(processor, imgs, prompts)
    assert inputs["batch_num_images"].tolist() == [2, 1]
    _assert_neutral_equals_stock(model, inputs)
    cfg = globalcom2.make_config("globalcom2", retention_ratio=0.5, budget="exact")
    feats, recs = O.compress(model, cfg, inputs["pixel_values"], **image_kwargs(inputs))
    n_tok = O.Geometry.from_config(model.config).side ** 2
    assert [f.shape[0] for f in feats[:2]] == [n_tok // 2 + 1] * 2
    assert feats[2].shape[0] == globalcom2.num_image_tokens(
        model.config, (120, 500), retention_ratio=0.5, budget="exact"
    )
    assert torch.equal(feats[0][-1], model.model.image_newline)  # the single view still ends with its newline
    globalcom2.apply(model, retention_ratio=0.5)
    assert model(**inputs).logits.isfinite().all()


def test_batch_of_mixed_sizes_matches_each_sample_alone(model, processor):
    imgs = [
        demo_image(height=500, width=500, seed=1),
        demo_image(height=400, width=150, seed=2),
        demo_image(height=40, width=1000, seed=3),
    ]
    prompts = [PROMPT, "<image>\nhow many ?", "<image>\ndescribe the picture please"]
    globalcom2.apply(model, retention_ratio=0.25)
    batch = inputs_for(processor, imgs, prompts)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None)
    n_prompt = batch["input_ids"].shape[1]
    for i, (img, prompt) in enumerate(zip(imgs, prompts)):
        single = inputs_for(processor, [img], [prompt])
        with torch.no_grad():
            alone = model(**single).logits[:, -1]
        assert torch.allclose(alone[0], logits[i], atol=1e-5), i
        gen = model.generate(**single, max_new_tokens=4, do_sample=False, eos_token_id=None)
        assert torch.equal(gen[0, single["input_ids"].shape[1] :], out[i, n_prompt:]), i


def test_generate_idiom_returns_prompt_then_new_tokens(model, processor):
    inputs = inputs_for(processor, [demo_image(height=500, width=500)])
    with torch.no_grad():
        stock = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None)
    globalcom2.apply(model, **NEUTRAL)
    same = model.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert torch.equal(stock, same)  # R = 1, neutral options: stock generate, token for token
    globalcom2.apply(model, retention_ratio=0.25)
    with torch.no_grad():
        first = model(**inputs).logits[:, -1].argmax(-1)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :n_prompt], inputs["input_ids"])
    assert torch.equal(out[:, n_prompt], first)


def test_remove_restores_the_stock_model_bit_for_bit(model, processor):
    inputs = inputs_for(processor, [demo_image(height=220, width=300)])
    with torch.no_grad():
        before = model(**inputs).logits
        globalcom2.apply(model, retention_ratio=0.25)
        model(**inputs)
        globalcom2.remove(model)
        after = model(**inputs).logits
    assert type(model) is LlavaOnevisionForConditionalGeneration
    assert torch.equal(before, after)


# ---------------------------------------------------------------- scoring without [CLS]


def test_default_scorer_is_global_dissimilarity_of_the_last_layer(processor):
    model = tiny_onevision_model(attn_implementation="eager")
    inputs = inputs_for(processor, [demo_image(height=220, width=300)])
    pv = inputs["pixel_values"][0]
    with torch.no_grad():
        out = model.model.vision_tower(pv, output_attentions=True, output_hidden_states=True)
    scores = {
        s: O.encode_views(model, globalcom2.make_config(scorer=s), inputs["pixel_values"], image_kwargs(inputs)).scores[
            0
        ]
        for s in ("auto", "global_dissimilarity", "attention_received")
    }
    tokens = out.hidden_states[-1]  # (V, N, D): SigLIP, every token a patch
    expected = -F.cosine_similarity(tokens, tokens.mean(1, keepdim=True), dim=-1)
    assert torch.equal(scores["auto"], scores["global_dissimilarity"])
    assert torch.allclose(scores["auto"], expected, atol=1e-6)
    assert torch.allclose(scores["attention_received"], out.attentions[-1].mean(1).mean(1), atol=1e-6)


# ---------------------------------------------------------------- every method: works or refuses clearly


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_works_or_refuses_at_apply(model, processor, name):
    inputs = inputs_for(
        processor, [demo_image(height=220, width=300, seed=1), demo_image(height=500, width=60, seed=2)]
    )
    cls = REGISTRY[name]
    opts = {"retention_ratio": 0.5} if cls.where == "vision" else {}
    if name == "sparsevlm":
        model = tiny_onevision_model(text_layers=8)
        opts = {"retention_ratio": 0.1, "layers": (2, 3, 5)}
    if name in O.UNSUPPORTED_METHODS:
        with pytest.raises(ValueError, match=f"method '{name}' does not run on LLaVA-OneVision"):
            globalcom2.apply(model, name, **opts)
        assert not globalcom2.is_patched(model)
        return
    globalcom2.apply(model, name, **opts)
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        out = model(**inputs)
    handle.remove()
    assert out.logits.isfinite().all()
    n_stock = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    if cls.where == "vision":
        assert seen[0][1].sum() < n_stock + n_text  # fewer visual tokens reach the language model
    gen = model.generate(**inputs, max_new_tokens=2, do_sample=False, eos_token_id=None)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 2


def test_in_llm_methods_run_on_the_qwen2_language_model(model, processor):
    """fastv prunes inside Qwen2: at R = 1 it keeps everything, so the logits are stock's; below, fewer."""
    inputs = inputs_for(processor, [demo_image(height=220, width=300)])
    with torch.no_grad():
        stock = model(**inputs).logits
        globalcom2.apply(model, "fastv", retention_ratio=1.0)
        ours = model(**inputs).logits
        assert torch.allclose(stock, ours, atol=1e-5)
        globalcom2.apply(model, "fastv", retention_ratio=0.25)
        pruned = model(**inputs).logits
    assert pruned.shape[1] < stock.shape[1]  # the sequence shrinks inside the language model
    assert not torch.allclose(stock[:, -1], pruned[:, -1], atol=1e-3)


# ---------------------------------------------------------------- bad input: clear errors, model untouched


def test_unsupported_model_names_the_supported_classes():
    with pytest.raises(TypeError, match="LlavaOnevisionForConditionalGeneration"):
        globalcom2.apply(torch.nn.Linear(2, 2))
    assert adapter_for(tiny_onevision_config()) is O.ADAPTER


def test_video_inputs_are_refused(model, processor):
    inputs = inputs_for(processor, [demo_image(height=220, width=300)])
    globalcom2.apply(model, retention_ratio=0.5)
    video = torch.zeros(1, 2, 3, 90, 90)
    with pytest.raises(ValueError, match="pixel_values_videos: video inputs are not supported"):
        model(**inputs, pixel_values_videos=video)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model(input_ids=inputs["input_ids"], pixel_values_videos=video)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model.generate(**inputs, pixel_values_videos=video, max_new_tokens=1)


def test_strategy_and_options_are_validated_before_anything_changes(model, processor):
    inputs = inputs_for(processor, [demo_image(height=220, width=300)])
    bad = tiny_onevision_model()
    bad.config.vision_feature_select_strategy = "default"
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'full'"):
        globalcom2.apply(bad)
    assert not globalcom2.is_patched(bad)
    with pytest.raises(ValueError, match="scorer='cls' needs a \\[CLS\\] token.*SigLIP"):
        globalcom2.apply(model, scorer="cls")
    assert not globalcom2.is_patched(model)
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'full'"):
        globalcom2.num_image_tokens(bad.config, (300, 220))
    globalcom2.apply(model, retention_ratio=0.5)
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'full'"):
        model(**inputs, vision_feature_select_strategy="default")
    with pytest.raises(ValueError, match="vision_aspect_ratio must be 'anyres_max_<m>'"):
        model(**inputs, vision_aspect_ratio="anyres")
    with pytest.raises(ValueError, match="pixel_values views must be 90x90"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][..., :42, :42]})
    with pytest.raises(ValueError, match="pixel_values has 2 views per image"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:, :2]})
    with pytest.raises(ValueError, match="batch_num_images must list"):
        model(**{**inputs, "batch_num_images": torch.tensor([2])})
    assert globalcom2.get_config(model).retention_ratio == 0.5


def test_authors_layout_becomes_stock_layout():
    cfg = O.ADAPTER.resolve(globalcom2.make_config("globalcom2", retention_ratio=0.5), None)
    assert cfg.layout == "spatial" and cfg.retention_ratio == 0.5
    assert O.ADAPTER.resolve(globalcom2.make_config("global_only"), None).layout == "spatial"
    rng = random.Random(0)
    config = tiny_onevision_config()
    for _ in range(20):  # the padded-grid newlines of "authors" never reach a OneVision LLM
        size = (rng.randint(10, 900), rng.randint(10, 900))
        n = globalcom2.num_image_tokens(config, size, retention_ratio=1.0, budget="exact")
        assert n == O.Geometry.from_config(config).stock_tokens(size)
