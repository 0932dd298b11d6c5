"""InternVL 2.5/3 (HF-native ``InternVLForConditionalGeneration``) on tiny random models: geometry, scores,
stock equality at R = 1, batches, generate, kernels, dtypes, counts, errors, every registered method."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import globalcom2
from globalcom2 import core
from globalcom2.core import scoring
from globalcom2.methods import REGISTRY, GlobalCom2Config
from globalcom2.models import adapter_for, internvl
from globalcom2.testing.tiny import demo_image
from globalcom2.testing.tiny_internvl import tiny_internvl_config, tiny_internvl_model, tiny_internvl_processor

PROMPT = "user : <IMG_CONTEXT> what is this ? assistant :"
# (width, height) of the test pictures: 2 x 5 tiles, one tile, 3 x 1 tiles
SIZES = [(300, 120), (100, 100), (130, 400)]


@pytest.fixture(scope="module")
def proc():
    return tiny_internvl_processor()


@pytest.fixture(scope="module")
def imgs():
    return [demo_image(height=h, width=w, seed=i) for i, (w, h) in enumerate(SIZES)]


def inputs_for(proc, images, prompts=None):
    """Processor output plus the ``image_sizes`` the patched model reads the crop grids from."""
    prompts = prompts or [PROMPT] * len(images)
    out = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    return dict(out), [(im.height, im.width) for im in images]


def lm_inputs(model):
    seen = []

    def hook(_module, args, kwargs):
        seen.append(kwargs.get("inputs_embeds"))

    return seen, model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)


NEUTRAL = dict(retention_ratio=1.0, allocation="uniform")


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def test_region_weights_are_exact_areas_and_match_the_authors_rule_when_the_grid_divides():
    w = core.crop_region_weights(16, (3, 1))  # 16 token rows over 3 crop rows
    assert w.shape == (3, 256)
    assert torch.allclose(w.sum(0), torch.ones(256, dtype=torch.float64))
    rows = w.view(3, 16, 16)[:, :, 0]  # (crop, token row)
    # token row 5 spans [5/16, 6/16): 1/3 of it lies above 1/3 (crop 0), 2/3 below (crop 1)
    assert torch.allclose(rows[:, 5], torch.tensor([1 / 3, 2 / 3, 0], dtype=torch.float64))
    assert torch.allclose(rows.sum(1), torch.full((3,), 16 / 3, dtype=torch.float64))  # equal areas
    for grid in [(2, 2), (1, 4), (4, 2)]:
        one_hot = torch.nn.functional.one_hot(core.crop_regions(16, grid), grid[0] * grid[1]).T.double()
        assert torch.equal(core.crop_region_weights(16, grid), one_hot)


def test_region_stats_with_weights():
    thumb = torch.rand(16)
    w = core.crop_region_weights(4, (3, 1))
    assert torch.allclose(core.crop_region_stats(thumb, 4, (3, 1), "sum", weights=w), w @ thumb.double())
    top = core.crop_region_stats(thumb, 4, (3, 1), "max", weights=w)
    expected = torch.stack([thumb.double()[w[j] > 0].max() for j in range(3)])
    assert torch.equal(top, expected)


def test_pixel_shuffle_groups_are_2x2_patch_blocks_in_raster_order():
    model = tiny_internvl_model()
    geo = internvl.Geometry.from_config(model.config)
    assert (geo.patches, geo.side, geo.shuffle) == (8, 4, 2)
    groups = internvl.shuffle_groups(model, geo)  # (16, 4)
    t = torch.arange(16)
    r, c = 2 * (t // 4), 2 * (t % 4)
    block = torch.stack([r * 8 + c, r * 8 + c + 1, (r + 1) * 8 + c, (r + 1) * 8 + c + 1], dim=1)
    assert torch.equal(groups.sort(1).values, block)


@pytest.mark.parametrize("size", [(120, 300), (100, 100), (400, 130), (2000, 40), (40, 2000), (200, 300), (300, 200)])
def test_grid_and_stock_count_follow_the_processor(proc, size):
    model_cfg = tiny_internvl_config()
    h, w = size
    out = proc(images=[demo_image(height=h, width=w)], text=[PROMPT], return_tensors="pt")
    geo = internvl.Geometry.from_config(model_cfg)
    grid = geo.grid(size)
    n_img = int((out["input_ids"] == model_cfg.image_token_id).sum())
    assert out["pixel_values"].shape[0] == geo.views(grid)
    assert n_img == geo.grid_tokens(grid)
    assert globalcom2.num_image_tokens(model_cfg, size, **NEUTRAL) == n_img


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def test_cls_scores_equal_the_eager_attention_row_averaged_over_2x2_patches(proc, imgs):
    """q/k norms recomputed exactly: the [CLS] softmax row of the last layer, head-averaged, then the mean of
    each pixel-shuffle group of patches."""
    model = tiny_internvl_model(attn_implementation="eager")
    inputs, _ = inputs_for(proc, imgs[:1])
    pv = inputs["pixel_values"]
    with torch.no_grad():
        att = model.model.vision_tower(pv, output_attentions=True, return_dict=True).attentions[-1]  # (V, H, T, T)
        patch = att[:, :, 0, 1:].mean(1)  # (V, P^2)
        cfg = GlobalCom2Config(score="softmax")
        scores = torch.cat(internvl.encode_views(model, cfg, pv, [(2, 5)], -1).scores)
    groups = internvl.shuffle_groups(model, internvl.Geometry.from_config(model.config))
    assert torch.allclose(scores, patch[:, groups].mean(-1), atol=1e-6)


@dataclasses.dataclass(frozen=True)
class ScoredConfig(GlobalCom2Config):
    """GlobalCom² with the ``scorer`` option (the field lands on every [CLS] method separately)."""

    scorer: str = "auto"


@pytest.mark.parametrize("scorer", ["attention_received", "global_dissimilarity"])
def test_other_scorers_run_and_rank_differently(proc, imgs, scorer):
    model = tiny_internvl_model()
    inputs, _ = inputs_for(proc, imgs[:1])
    pv = inputs["pixel_values"]
    with torch.no_grad():
        enc = internvl.encode_views(model, ScoredConfig(), pv, [(2, 5)], -1)
        auto, hs = torch.cat(enc.scores), enc.hidden_states
        cls_ = torch.cat(internvl.encode_views(model, ScoredConfig(scorer="cls"), pv, [(2, 5)], -1).scores)
        other = torch.cat(internvl.encode_views(model, ScoredConfig(scorer=scorer), pv, [(2, 5)], -1).scores)
    assert torch.equal(auto, cls_)  # "auto" is "cls" on InternViT (it has a [CLS] token)
    assert other.shape == auto.shape and not torch.allclose(other, auto)
    if scorer == "global_dissimilarity":
        groups = internvl.shuffle_groups(model, internvl.Geometry.from_config(model.config))
        expected = scoring.global_dissimilarity(hs[-1][:, 1:])[:, groups].mean(-1)
        assert torch.allclose(other, expected)


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2])
def test_ratio_one_neutral_options_feed_the_llm_stock_input(proc, imgs, index):
    model = tiny_internvl_model()
    inputs, sizes = inputs_for(proc, [imgs[index]])
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        stock = model(**inputs).logits
        globalcom2.apply(model, **NEUTRAL)
        ours = model(**inputs, image_sizes=sizes).logits
    handle.remove()
    assert torch.equal(seen[0], seen[1])
    assert torch.allclose(stock, ours, atol=1e-5)


@pytest.mark.parametrize(
    "method,options",
    [("divprune", {}), ("cdpruner", {}), ("fastervlm", {}), ("crops_only", {}), ("globalcom2", {"budget": "exact"})],
)
def test_other_methods_at_ratio_one_feed_the_llm_stock_input(proc, imgs, method, options):
    """Methods that order tokens themselves (divprune: the family's stock sequence) or not, mapped back to tiles."""
    model = tiny_internvl_model()
    inputs, sizes = inputs_for(proc, [imgs[0]])
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        model(**inputs)
        globalcom2.apply(model, method=method, retention_ratio=1.0, **options)
        model(**inputs, image_sizes=sizes)
    handle.remove()
    if method == "crops_only":  # everything but the thumbnail tile, in stock order
        n_text = int((inputs["input_ids"] != model.config.image_token_id).sum())
        first = int((inputs["input_ids"][0] == model.config.image_token_id).nonzero()[0])
        assert seen[1].shape[1] == n_text + 160
        assert torch.equal(seen[1][0, : first + 160], seen[0][0, : first + 160])
        return
    assert torch.equal(seen[0], seen[1])


def test_ratio_one_with_another_feature_layer(proc, imgs):
    model = tiny_internvl_model(vision_feature_layer=-2)
    inputs, sizes = inputs_for(proc, [imgs[2]])
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        model(**inputs)
        globalcom2.apply(model, **NEUTRAL)
        model(**inputs, image_sizes=sizes)
    handle.remove()
    assert torch.equal(seen[0], seen[1])


def test_emission_is_crops_in_tile_order_then_thumbnail_in_raster_order(proc, imgs):
    model = tiny_internvl_model()
    inputs, sizes = inputs_for(proc, [imgs[0]])
    globalcom2.apply(model, retention_ratio=0.3)
    cfg = globalcom2.get_config(model)
    with torch.no_grad():
        feats, counts, (rec,) = internvl.ADAPTER.prepare_images(
            model, cfg, inputs["pixel_values"], {"image_sizes": sizes}, inputs["input_ids"]
        )
    assert rec.grid == (2, 5) and rec.n_views == 11 and counts == [176]
    order = rec.order
    assert torch.equal(order, order.sort().values)  # tile by tile, raster inside; thumbnail (tile 10) last
    thumb = order[order >= 10 * 16] - 10 * 16
    assert thumb.numel() == math.floor(16 * 0.3)
    scores = rec.scores  # thumbnail first
    assert torch.equal(thumb, core.top_indices(scores[0], thumb.numel()).sort().values)
    stock = model.model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output.detach()
    assert torch.equal(feats[0], stock.flatten(0, 1)[order])


def test_crop_ratios_use_area_weights_for_grids_that_do_not_divide_the_thumbnail(proc, imgs):
    model = tiny_internvl_model()
    inputs, sizes = inputs_for(proc, [imgs[2]])  # 3 x 1 tiles over a 4 x 4 thumbnail
    globalcom2.apply(model, retention_ratio=0.5)
    cfg = globalcom2.get_config(model)
    with torch.no_grad():
        _, _, (rec,) = internvl.ADAPTER.prepare_images(
            model, cfg, inputs["pixel_values"], {"image_sizes": sizes}, inputs["input_ids"]
        )
    assert rec.grid == (3, 1)
    weights = core.crop_region_weights(4, (3, 1))
    expected = core.softmax_retention(weights @ rec.scores[0].double(), 0.5, cfg.temperature)
    assert torch.allclose(rec.selection.crop_ratios, expected)
    authors = core.softmax_retention(core.crop_region_stats(rec.scores[0], 4, (3, 1)), 0.5, cfg.temperature)
    assert not torch.allclose(expected, authors)  # the authors' cells (1, 1, 2 rows) weigh the crops otherwise


def test_single_tile_image_is_its_own_global_view(proc, imgs):
    model = tiny_internvl_model()
    inputs, sizes = inputs_for(proc, [imgs[1]])
    globalcom2.apply(model, retention_ratio=0.25)
    cfg = globalcom2.get_config(model)
    with torch.no_grad():
        _, counts, (rec,) = internvl.ADAPTER.prepare_images(
            model, cfg, inputs["pixel_values"], {}, inputs["input_ids"]
        )  # no grid needed for one tile
    assert rec.grid == (1, 1) and rec.n_views == 1 and counts == [16]
    assert torch.equal(rec.order, core.top_indices(rec.scores[0], 4).sort().values)
    assert globalcom2.num_image_tokens(model, sizes[0], budget="exact") == rec.num_tokens == 4
    assert globalcom2.num_image_tokens(model, sizes[0], budget="exact", retention_ratio=1.0) == 16


def test_crop_grid_is_read_from_the_tiles_and_decides_the_layout(proc):
    model = tiny_internvl_model()
    wide, tall = demo_image(height=200, width=300), demo_image(height=300, width=200)  # 6 tiles each: 2 x 3 and 3 x 2
    inputs, sizes = inputs_for(proc, [wide])
    globalcom2.apply(model, retention_ratio=0.5)
    cfg = globalcom2.get_config(model)
    with torch.no_grad():
        recovered = internvl.ADAPTER.prepare_images(model, cfg, inputs["pixel_values"], {}, inputs["input_ids"])
        by_size = internvl.ADAPTER.prepare_images(
            model, cfg, inputs["pixel_values"], {"image_sizes": sizes}, inputs["input_ids"]
        )
        by_grid = internvl.ADAPTER.prepare_images(
            model, cfg, inputs["pixel_values"], {"image_grids": [(2, 3)]}, inputs["input_ids"]
        )
    assert recovered[2][0].grid == by_size[2][0].grid == (2, 3)
    assert torch.equal(recovered[0][0], by_size[0][0]) and torch.equal(by_size[0][0], by_grid[0][0])
    rec = recovered[2][0]
    tile_scores = torch.cat([rec.scores[1:], rec.scores[:1]])  # (7, 16) back in the processor's tile order
    swapped = internvl.select_image(cfg, tile_scores.new_zeros(7, 16, 1), tile_scores, (3, 2))
    assert not torch.equal(rec.selection.crop_ratios, swapped.selection.crop_ratios)  # the grid decides the budgets
    with pytest.raises(ValueError, match="image_grids gives image 0 a 3 x 2 grid .* contradicts"):
        model(**inputs, image_grids=[(3, 2)])
    assert internvl.crop_grid((300, 200), 112) == (3, 2)
    tall_inputs, _ = inputs_for(proc, [tall])
    assert tall_inputs["pixel_values"].shape[0] == 7
    with pytest.raises(ValueError, match=r"image_sizes gives image 0 the size \(100, 400\), a 1 x 4 tile grid"):
        model(**tall_inputs, image_sizes=[(100, 400)])


def test_batch_of_mixed_sizes_matches_alone_and_generate_idiom(proc, imgs):
    model = tiny_internvl_model()
    globalcom2.apply(model, retention_ratio=0.4)
    prompts = [PROMPT, "user : <IMG_CONTEXT> how many ? assistant :", "the <IMG_CONTEXT> describe the picture please"]
    batch, sizes = inputs_for(proc, imgs, prompts)
    out = model.generate(**batch, image_sizes=sizes, max_new_tokens=4, do_sample=False, eos_token_id=None)
    n_prompt = batch["input_ids"].shape[1]
    assert torch.equal(out[:, :n_prompt], batch["input_ids"])
    for i, (img, prompt) in enumerate(zip(imgs, prompts)):
        single, size = inputs_for(proc, [img], [prompt])
        with torch.no_grad():
            first = model(**single, image_sizes=size).logits[0, -1].argmax()
        alone = model.generate(**single, image_grids=[internvl.crop_grid(size[0], 112)], max_new_tokens=4,
                               do_sample=False, eos_token_id=None)  # fmt: skip
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], out[i, n_prompt:]), i
        assert alone[0, single["input_ids"].shape[1]] == first


def test_two_images_in_one_prompt(proc, imgs):
    model = tiny_internvl_model()
    globalcom2.apply(model, retention_ratio=0.25, budget="exact")
    inputs, sizes = inputs_for(proc, imgs[:2], ["<IMG_CONTEXT> and <IMG_CONTEXT> compare"])
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        model(**inputs, image_sizes=sizes)
    handle.remove()
    n_text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    assert seen[0].shape[1] == n_text + sum(globalcom2.num_image_tokens(model, s) for s in sizes)


def test_processor_grids_follow_the_processors_own_settings(imgs):
    small = tiny_internvl_processor(max_patches=4)
    grids = internvl.processor_grids(small, imgs)
    assert grids == [(1, 3), (1, 1), (3, 1)]
    out = small(images=imgs, text=["<IMG_CONTEXT> <IMG_CONTEXT> <IMG_CONTEXT>"], return_tensors="pt")
    assert out["pixel_values"].shape[0] == 4 + 1 + 4
    model = tiny_internvl_model()
    globalcom2.apply(model, retention_ratio=0.5)
    with pytest.raises(ValueError, match=r"image_sizes gives image 0 the size \(120, 300\), a 2 x 5 tile grid"):
        model(**out, image_sizes=[(im.height, im.width) for im in imgs])  # the default 12 tiles, not 4
    with torch.no_grad():
        given = model(**out, image_grids=grids).logits
        assert torch.equal(model(**out).logits, given)  # the arrangement is read from the tiles


def test_viz_draws_the_tokens_the_llm_receives(proc, imgs):
    from globalcom2.tools import viz

    model = tiny_internvl_model()
    for img in imgs[:2]:
        (pn,) = viz.panels(model, proc, img, ("globalcom2",), (0.25,))
        rec = pn.record
        inputs, sizes = inputs_for(proc, [img])
        globalcom2.apply(model, retention_ratio=0.25)
        with torch.no_grad():
            _, _, (ran,) = internvl.ADAPTER.prepare_images(
                model, globalcom2.get_config(model), inputs["pixel_values"], {"image_sizes": sizes}, inputs["input_ids"]
            )
        globalcom2.remove(model)
        assert torch.equal(rec.order, ran.order)
        assert sum(pn.kept_patch_counts()) == rec.num_tokens
        assert pn.stock_tokens == int((inputs["input_ids"] == model.config.image_token_id).sum())
    with pytest.raises(ValueError, match="not supported on InternVL"):
        viz.panels(model, proc, imgs[0], ("visionzip",), (0.25,))


def test_flops_cli_counts_internvl_tokens(tmp_path, capsys):
    from globalcom2.tools import flops

    tiny_internvl_config().save_pretrained(tmp_path)
    flops.main(["--config", str(tmp_path), "--image-size", "120", "300", "--ratios", "0.25",
                "--methods", "fastervlm", "globalcom2", "visionzip"])  # fmt: skip
    out = capsys.readouterr().out
    assert "(internvl geometry)" in out
    assert "fastervlm R=0.25  stock 176 -> 44\n" in out
    assert "globalcom2 R=0.25  stock 176 -> 44 (budget='exact')" in out
    assert "visionzip R=0.25  stock 176: method 'visionzip' is not supported on InternVL" in out


def test_lmms_plugin_needs_no_crop_grids(proc, imgs):
    pytest.importorskip("lmms_eval")
    from globalcom2.integrations.lmms_eval.plugin import GlobalCom2LlavaNext
    from globalcom2.tools import model_args as opts

    plugin = GlobalCom2LlavaNext.__new__(GlobalCom2LlavaNext)  # the loaded state, without a checkpoint on disk
    plugin.processor, plugin.family, plugin._device = proc, "internvl", torch.device("cpu")
    plugin._model = tiny_internvl_model()
    plugin.choice = opts.method_choice("globalcom2", retention_ratio=0.25)
    globalcom2.apply(plugin._model, plugin.choice.config)
    batch = plugin._inputs(["<IMG_CONTEXT> what ?"], imgs[:1])
    assert "image_grids" not in batch and "image_sizes" not in batch  # the processor's output as it is
    with torch.no_grad():
        plugin._model(**batch)


def test_eager_and_sdpa_agree_bf16_runs_and_remove_is_bit_exact(proc, imgs):
    inputs, sizes = inputs_for(proc, imgs)
    outs = []
    for attn in ("eager", "sdpa"):
        model = tiny_internvl_model(attn_implementation=attn)
        globalcom2.apply(model, retention_ratio=0.25)
        outs.append(model.generate(**inputs, image_sizes=sizes, max_new_tokens=4, do_sample=False, eos_token_id=None))
    assert torch.equal(*outs)
    model = tiny_internvl_model(dtype=torch.bfloat16)
    twin = tiny_internvl_model(dtype=torch.bfloat16)
    bf = dict(inputs, pixel_values=inputs["pixel_values"].to(torch.bfloat16))
    with torch.no_grad():
        ref = twin(**bf).logits
        globalcom2.apply(model, retention_ratio=0.25)
        out = model(**bf, image_sizes=sizes)
        assert out.logits.dtype == torch.bfloat16 and out.logits.isfinite().all()
        model.generate(**bf, image_sizes=sizes, max_new_tokens=2, do_sample=False)
        globalcom2.remove(model)
        assert type(model) is type(twin)
        assert torch.equal(model(**bf).logits, ref)


@pytest.mark.parametrize("size", [(120, 300), (100, 100), (400, 130), (2000, 40), (40, 2000), (230, 700)])
@pytest.mark.parametrize(
    "method,options",
    [
        ("globalcom2", {"budget": "exact"}),
        ("globalcom2", {"allocation": "uniform"}),
        ("fastervlm", {}),
        ("thumbnail_only", {}),
        ("crops_only", {}),
    ],
)
def test_counts_equal_the_formula(proc, size, method, options):
    model = tiny_internvl_model()
    h, w = size
    inputs, sizes = inputs_for(proc, [demo_image(height=h, width=w)])
    globalcom2.apply(model, method=method, retention_ratio=0.3, **options)
    with torch.no_grad():
        _, _, (rec,) = internvl.ADAPTER.prepare_images(
            model, globalcom2.get_config(model), inputs["pixel_values"], {"image_sizes": sizes}, inputs["input_ids"]
        )
    assert globalcom2.num_image_tokens(model, size) == rec.num_tokens
    n, v = rec.grid[0] * rec.grid[1], rec.n_views
    if method == "globalcom2" and options.get("budget") == "exact":  # int(N R) + round(R n N)
        assert rec.num_tokens == math.floor(16 * 0.3) + (math.floor(0.3 * n * 16 + 0.5) if v > 1 else 0)


# --------------------------------------------------------------------------------------------
# Every method
# --------------------------------------------------------------------------------------------

VISION = sorted(n for n, c in REGISTRY.items() if c.where == "vision")
REFUSED = {"visionzip"}


@pytest.mark.parametrize("name", VISION)
def test_every_vision_method_runs_or_is_refused_at_apply(proc, imgs, name):
    model = tiny_internvl_model()
    if name in REFUSED:
        with pytest.raises(ValueError, match="not supported on InternVL"):
            globalcom2.apply(model, method=name)
        assert not globalcom2.is_patched(model)
        return
    globalcom2.apply(model, method=name, retention_ratio=0.5)
    batch, sizes = inputs_for(proc, imgs[:2], [PROMPT, "the <IMG_CONTEXT> cat"])
    out = model.generate(**batch, image_sizes=sizes, max_new_tokens=3, do_sample=False, eos_token_id=None)
    n_prompt = batch["input_ids"].shape[1]
    for i in range(2):
        single, size = inputs_for(proc, [imgs[i]], [[PROMPT, "the <IMG_CONTEXT> cat"][i]])
        alone = model.generate(**single, image_sizes=size, max_new_tokens=3, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], out[i, n_prompt:]), (name, i)


def test_fastv_prunes_inside_the_qwen2_language_model(proc, imgs):
    model = tiny_internvl_model(text_layers=4)
    inputs, sizes = inputs_for(proc, [imgs[0]])
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - n_img
    globalcom2.apply(model, method="fastv", retention_ratio=0.25, k=2)
    lengths = []
    hooks = [
        layer.register_forward_hook(lambda _m, _a, out: lengths.append(out.shape[1]))  # length each layer processed
        for layer in model.model.language_model.layers
    ]
    with torch.no_grad():
        out = model(**inputs, image_sizes=sizes)
    for h in hooks:
        h.remove()
    kept = math.floor(n_img * 0.25)
    assert lengths == [n_img + n_text] * 2 + [kept + n_text] * 2
    assert out.logits.shape[1] == kept + n_text
    a = model.generate(**inputs, image_sizes=sizes, max_new_tokens=1, do_sample=False)
    b = model.generate(**inputs, image_sizes=sizes, max_new_tokens=1, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_sparsevlm_batch_matches_alone(proc, imgs):
    model = tiny_internvl_model(text_layers=8)
    globalcom2.apply(model, method="sparsevlm", retention_ratio=0.5, layers=(1, 3, 5))
    prompts = [PROMPT, "the <IMG_CONTEXT> cat"]
    batch, sizes = inputs_for(proc, imgs[:2], prompts)
    out = model.generate(**batch, image_sizes=sizes, max_new_tokens=3, do_sample=False, eos_token_id=None)
    n_prompt = batch["input_ids"].shape[1]
    for i in range(2):
        single, size = inputs_for(proc, [imgs[i]], [prompts[i]])
        alone = model.generate(**single, image_sizes=size, max_new_tokens=3, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], out[i, n_prompt:]), i


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_adapter_lookup():
    assert adapter_for(tiny_internvl_config()) is internvl.ADAPTER
    with pytest.raises(TypeError, match="InternVLForConditionalGeneration"):
        globalcom2.apply(torch.nn.Linear(2, 2))


def test_unsupported_config_is_refused_and_model_untouched():
    model = tiny_internvl_model()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'default'"):
        globalcom2.apply(model)
    assert not globalcom2.is_patched(model)
    model.config.vision_feature_select_strategy = "default"
    model.config.vision_feature_layer = [-1, -2]
    with pytest.raises(ValueError, match="vision_feature_layer must be one int"):
        globalcom2.apply(model)
    assert not globalcom2.is_patched(model)


def test_bad_call_inputs_name_the_argument(proc, imgs):
    model = tiny_internvl_model()
    globalcom2.apply(model, retention_ratio=0.5)
    inputs, sizes = inputs_for(proc, imgs[:1])
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'default'"):
        model(**inputs, image_sizes=sizes, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="vision_feature_layer must be an int"):
        model(**inputs, image_sizes=sizes, vision_feature_layer=7)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"][:, :, :56]), image_sizes=sizes)
    with pytest.raises(ValueError, match="pixel_values holds"):
        model(**dict(inputs, pixel_values=inputs["pixel_values"][:-1]), image_sizes=sizes)
    with pytest.raises(ValueError, match=r"image_sizes must be a \(1, 2\) array"):
        model(**inputs, image_sizes=sizes * 2)
    with pytest.raises(ValueError, match="image_grids gives image 0 a 2 x 2 grid"):
        model(**inputs, image_grids=[(2, 2)])
    with pytest.raises(ValueError, match="image_grids must hold positive"):
        model(**inputs, image_grids=[(0, 10)])
