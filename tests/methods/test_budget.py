"""Exact budgets: the number of visual tokens is a function of the image size alone (issue 10, section 1)."""

import math
import random

import pytest
import torch

import globalcom2
from conftest import PROMPT, lm_inputs, make_inputs
from globalcom2 import core
from globalcom2.methods import REGISTRY, GlobalCom2Config, ImageContext
from globalcom2.models import llava_next as A
from globalcom2.testing.tiny import demo_image, tiny_config, tiny_model

# vision-side methods with a `budget` option: every one of them (issue 12 added it to the newer methods)
VISION = sorted(n for n, c in REGISTRY.items() if c.where == "vision" and "budget" in c.option_names())
# dart's default form prunes in the LLM; its embedding form (form="embedding") is a vision-side method with a budget
NO_BUDGET = sorted(n for n, c in REGISTRY.items() if c.where == "vision" and "budget" not in c.option_names())
# the newer methods read more than [CLS] scores (features, hidden states, keys, the prompt): their counts are
# checked against real runs of the tiny model below; the rest on hand-made scores of every kind
NEWER = ("visionzip", "divprune", "dart", "cdpruner")
SCORE_ONLY = [n for n in VISION if n not in NEWER]
IN_LLM = sorted(n for n, c in REGISTRY.items() if c.where == "llm")
EXTREME = [(1, 4000), (4000, 1), (1, 1), (2, 3), (900, 8), (8, 900), (112, 112), (224, 112), (47, 752), (5000, 5000)]
RATIOS = [1.0, 0.95, 0.9, 0.5, 0.25, 0.1, 1e-3, 1e-6]


def _sizes(seed, n):
    """``n`` random (height, width) pairs, a third of them very thin, plus the extreme ones."""
    rng = random.Random(seed)
    out = list(EXTREME)
    while len(out) < n:
        h, w = rng.randint(1, 3000), rng.randint(1, 3000)
        kind = rng.randrange(3)
        h = rng.randint(1, 12) if kind == 1 else h
        w = rng.randint(1, 12) if kind == 2 else w
        out.append((h, w))
    return out


def _scores(geo, size, draw):
    """(1 + n, N) scores of several kinds of content: noise at any scale, all equal, one hot spot, huge."""
    nph, npw = geo.grid(size)
    shape = (1 + nph * npw, geo.side**2)
    g = torch.Generator().manual_seed(draw)
    kind = draw % 4
    if kind == 0:
        return torch.randn(shape, generator=g) * 10 ** (draw % 5)
    if kind == 1:
        return torch.zeros(shape)
    if kind == 2:
        x = torch.rand(shape, generator=g)
        x[0, int(torch.randint(shape[1], (1,), generator=g))] = 1e4  # the thumbnail points at one crop
        return x
    return torch.rand(shape, generator=g) * 1e30


def _formula(geo, size, ratio, layout):
    """K of GlobalCom² with budget="exact", written out from the documented formula (README)."""
    nph, npw = geo.grid(size)
    s, n_view = geo.side, geo.side**2
    top, bottom, left, right = core.unpadded_box((nph, npw), s, size, None if layout == "authors" else 7)
    h, w = bottom - top, right - left
    k_thumb = math.floor(n_view * ratio)
    k_crops = math.floor(ratio * h * w + 0.5)
    newlines = nph * s if layout == "authors" else h
    if layout == "authors":  # held to the stock count of the unpadded box, crops first
        rows, cols = (h, w) if h and w else (0, 0)
        excess = max(k_thumb + k_crops + newlines - (n_view + rows * (cols + 1)), 0)
        cut = min(excess, k_crops)
        k_crops, k_thumb = k_crops - cut, max(k_thumb - (excess - cut), 0)
    return k_thumb + k_crops + newlines


# ---------------------------------------------------------------- allocation: known answers


def test_exact_total_rounds_half_up_and_never_exceeds_the_tokens():
    assert core.exact_total(torch.tensor([3, 2]), 0.5) == 3  # 2.5 -> 3
    assert core.exact_total(torch.tensor([6]), 0.25) == 2  # 1.5 -> 2
    assert core.exact_total(torch.tensor([10, 10]), 0.24) == 5  # 4.8 -> 5
    assert core.exact_total(torch.tensor([7, 0]), 1.0) == 7
    assert core.exact_total(torch.tensor([], dtype=torch.long), 0.5) == 0
    assert core.exact_total(torch.tensor([1000]), 1e-6) == 0


def test_water_filling_known_answers():
    w, caps = torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([10, 1, 10, 5])
    cases = {
        0: ([0, 0, 0, 0], [0, 0, 0, 0]),
        5: ([1, 1, 3, 0], [1, 1, 3, 0]),  # crop 1 is full at lam = 0.5; the rest share 4 as 1:3
        11: ([2.5, 1, 7.5, 0], [2, 1, 8, 0]),  # tie of .5 remainders: the larger weight wins
        20: ([9, 1, 10, 0], [9, 1, 10, 0]),  # crops 1 and 2 full
        23: ([10, 1, 10, 2], [10, 1, 10, 2]),  # every weighted crop full: the weight-0 crop takes the rest
        26: ([10, 1, 10, 5], [10, 1, 10, 5]),
    }
    for total, (shares, ints) in cases.items():
        assert torch.allclose(core.water_fill(w, caps, total), torch.tensor(shares, dtype=torch.float64)), total
        assert core.allocate_exact(w, caps, total).tolist() == ints, total


def test_water_filling_proportional_when_nothing_is_capped():
    # crop scores N_j r_j = 8, 4, 4 with room to spare: 10 tokens -> 5, 2.5, 2.5 -> ties by weight, then index
    k = core.allocate_exact(torch.tensor([8.0, 4.0, 4.0]), torch.tensor([16, 16, 16]), 10)
    assert k.tolist() == [5, 3, 2]
    # equal weights and equal remainders: lower index first
    assert core.allocate_exact(torch.ones(4), torch.full((4,), 9), 6).tolist() == [2, 2, 1, 1]
    # the largest remainder wins over the larger weight
    assert core.allocate_exact(torch.tensor([2.0, 1.4]), torch.tensor([9, 9]), 4).tolist() == [2, 2]


def test_water_filling_ignores_bad_weights_and_empty_crops():
    w = torch.tensor([float("nan"), 1.0, -3.0, float("inf"), 5.0])
    caps = torch.tensor([4, 4, 4, 4, 0])
    # only crop 1 has a usable weight; once it is full the rest goes by caps to crops 0, 2, 3
    assert core.allocate_exact(w, caps, 3).tolist() == [0, 3, 0, 0, 0]
    assert core.allocate_exact(w, caps, 10).tolist() == [2, 4, 2, 2, 0]
    assert core.allocate_exact(torch.zeros(3), torch.tensor([1, 2, 3]), 6).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"total must be in \[0, sum of caps"):
        core.allocate_exact(torch.ones(2), torch.tensor([1, 1]), 3)


def test_allocation_sums_to_the_total_within_caps_for_random_weights():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 12, (1,), generator=g))
        caps = torch.randint(0, 600, (n,), generator=g)
        w = torch.rand(n, generator=g) ** 4 * caps
        if trial % 3 == 0:
            w[torch.rand(n, generator=g) < 0.3] = 0.0
        total = int(torch.randint(0, int(caps.sum()) + 1, (1,), generator=g))
        k = core.allocate_exact(w, caps, total)
        x = core.water_fill(w, caps, total)
        assert int(k.sum()) == total and bool((k >= 0).all()) and bool((k <= caps).all())
        assert bool(((k - x).abs() < 1).all())  # integers within one of the real shares
        assert torch.equal(k, core.allocate_exact(w, caps, total))  # deterministic


# ---------------------------------------------------------------- count = num_image_tokens, any content


def test_globalcom2_exact_count_is_the_formula_for_any_content():
    cfg = tiny_config()
    geo = A.Geometry.from_config(cfg)
    rng = random.Random(1)
    sizes = _sizes(seed=0, n=240)
    for i, size in enumerate(sizes):
        ratio = RATIOS[i % len(RATIOS)] if i < 2 * len(RATIOS) else rng.choice(RATIOS + [rng.random()])
        layout = ("authors", "spatial")[i % 2]
        allocation = ("softmax_sum", "softmax_max", "ntopk", "uniform")[(i // 2) % 4]
        method = globalcom2.make_config(
            "globalcom2", retention_ratio=ratio, budget="exact", layout=layout, allocation=allocation
        )
        k = globalcom2.num_image_tokens(cfg, size, method=method)
        assert k == _formula(geo, size, ratio, layout), (size, ratio, layout)
        assert k <= geo.stock_tokens(size), (size, ratio, layout)
        for draw in range(4):
            rec = A.select_image(method, _scores(geo, size, i * 7 + draw), size, geo)
            assert rec.num_tokens == k, (size, ratio, layout, allocation, draw)


@pytest.mark.parametrize("name", SCORE_ONLY)
def test_every_vision_method_emits_num_image_tokens_with_exact_budget(name):
    cfg = tiny_config()
    geo = A.Geometry.from_config(cfg)
    rng = random.Random(name)
    for i, size in enumerate(_sizes(seed=len(name), n=30)):
        ratio = rng.choice(RATIOS + [rng.random()])
        method = globalcom2.make_config(name, retention_ratio=ratio, budget="exact")
        k = globalcom2.num_image_tokens(cfg, size, method=name, retention_ratio=ratio, budget="exact")
        for draw in range(3):
            rec = A.select_image(method, _scores(geo, size, 31 * i + draw), size, geo)
            assert rec.num_tokens == k, (name, size, ratio, draw)


def test_count_is_content_independent_without_exact_where_the_method_is():
    cfg = tiny_config()
    geo = A.Geometry.from_config(cfg)
    fixed = [
        ("uniform", {}),
        ("globalcom2", {"allocation": "uniform"}),
        ("fastervlm", {}),
        ("fastervlm", {"unpad": True}),
        ("thumbnail_only", {}),
        ("crops_only", {}),
        ("drop_random_crop", {}),
    ]
    for name, opts in fixed:
        for i, size in enumerate(_sizes(seed=3, n=25)):
            ratio = RATIOS[i % len(RATIOS)]
            method = globalcom2.make_config(name, retention_ratio=ratio, **opts)
            k = globalcom2.num_image_tokens(cfg, size, method=method)
            if not isinstance(method, GlobalCom2Config):  # GlobalCom²'s exact rule also applies to uniform
                assert k == globalcom2.num_image_tokens(cfg, size, method=method, budget="exact")  # a no-op
            for draw in range(3):
                assert A.select_image(method, _scores(geo, size, draw), size, geo).num_tokens == k, (name, size)
    # and the default budget's counts are what they always were: int(N_j R) per crop
    uniform = globalcom2.make_config("uniform", retention_ratio=0.3)
    size = (300, 220)
    nph, npw = geo.grid(size)
    valid = core.box_mask(core.unpadded_box((nph, npw), geo.side, size), (nph, npw), geo.side)
    crops = int(core.count_kept(valid.sum(1), 0.3).sum())
    assert globalcom2.num_image_tokens(cfg, size, method=uniform) == int(64 * 0.3) + crops + nph * geo.side


def test_exact_budget_changes_only_the_crop_counts_not_the_choice_inside_a_crop():
    cfg = tiny_config()
    geo = A.Geometry.from_config(cfg)
    size = (300, 650)
    scores = _scores(geo, size, 2)
    authors = globalcom2.make_config("globalcom2", retention_ratio=0.3)
    exact = globalcom2.make_config("globalcom2", retention_ratio=0.3, budget="exact")
    a = A.select_image(authors, scores, size, geo)
    e = A.select_image(exact, scores, size, geo)
    assert torch.equal(a.selection.thumb_keep, e.selection.thumb_keep)
    assert torch.equal(a.selection.crop_ratios, e.selection.crop_ratios)
    k = e.selection.crop_keep.sum(1)
    ctx = ImageContext(scores=scores, side=geo.side, grid=e.grid, valid=e.valid)
    assert torch.equal(e.selection.crop_keep, core.keep_top_per_row(exact.crop_importance(ctx), e.valid, k))
    n_tok = e.valid.sum(1)
    assert int(k.sum()) == core.exact_total(n_tok, 0.3)
    assert torch.equal(k, core.allocate_exact(n_tok * e.selection.crop_ratios, n_tok, int(k.sum())))
    share = n_tok * e.selection.crop_ratios  # nothing is capped here: k_j is within one of its share
    assert bool(((k - share * int(k.sum()) / share.sum()).abs() < 1).all())


def test_exact_drop_variants_share_the_tokens_of_all_but_the_largest_crop():
    cfg = tiny_config()
    geo = A.Geometry.from_config(cfg)
    size = (200, 1000)  # 1 x 3 grid, crops of unequal unpadded size
    for name in ("drop_important_crop", "drop_unimportant_crop"):
        method = globalcom2.make_config(name, retention_ratio=1.0, budget="exact")
        for draw in range(4):
            rec = A.select_image(method, _scores(geo, size, draw), size, geo)
            kept = rec.selection.crop_keep.sum(1)
            n_tok = rec.valid.sum(1)
            assert int(kept.sum()) == int(n_tok.sum() - n_tok.max())
            assert int(kept[rec.selection.crop_ratios == 0].sum()) == 0  # the dropped crop is gone


# ---------------------------------------------------------------- R = 1 with neutral options = stock

NEUTRAL = {"retention_ratio": 1.0, "budget": "exact", "thumbnail_order": "spatial", "layout": "spatial"}


def test_ratio_one_neutral_options_count_equals_stock_for_any_size():
    cfg = tiny_config()
    geo = A.Geometry.from_config(cfg)
    for size in _sizes(seed=5, n=200):
        for allocation in ("softmax_sum", "ntopk"):
            k = globalcom2.num_image_tokens(cfg, size, allocation=allocation, **NEUTRAL)
            assert k == geo.stock_tokens(size), size


def test_ratio_one_neutral_options_feed_the_llm_stock_input(model, processor):
    imgs = [
        demo_image(height=220, width=300, seed=1),
        demo_image(height=400, width=150, seed=2),
        demo_image(height=120, width=500, seed=3),
    ]
    inputs = make_inputs(processor, imgs)
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        stock = model(**inputs).logits
        globalcom2.apply(model, **NEUTRAL)  # softmax_sum allocation: every crop is full at R = 1 anyway
        ours = model(**inputs).logits
    handle.remove()
    assert torch.equal(seen[0][0], seen[1][0])  # the very same LLM input
    assert torch.equal(seen[0][1], seen[1][1])
    real = inputs["attention_mask"].bool()  # stock derives positions itself: float noise only
    assert torch.allclose(stock[real], ours[real], atol=1e-3)


# ---------------------------------------------------------------- the real model


def test_tiny_model_emits_num_image_tokens_for_any_picture(model, processor):
    cases = [((300, 220), 0.25), ((150, 400), 0.5), ((500, 120), 0.1), ((1000, 30), 0.9), ((40, 40), 0.33)]
    for (w, h), ratio in cases:
        method = globalcom2.make_config("globalcom2", retention_ratio=ratio, budget="exact")
        expected = globalcom2.num_image_tokens(model, (h, w), method=method)
        counts = set()
        for seed in range(3):
            inputs = processor(images=demo_image(height=h, width=w, seed=seed), text="<image>", return_tensors="pt")
            noise = torch.rand(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(seed))
            for pixels in (inputs["pixel_values"], noise * 4 - 2):  # a picture and pure noise
                _, recs = A.compress(model, method, pixels, inputs["image_sizes"])
                counts.add(recs[0].num_tokens)
        assert counts == {expected}, ((w, h), ratio, counts)


def test_forward_and_batch_with_exact_budget(model, processor):
    imgs = [
        demo_image(height=220, width=300, seed=1),
        demo_image(height=400, width=150, seed=2),
        demo_image(height=120, width=500, seed=3),
    ]
    prompts = [PROMPT, "USER: <image>\nhow many ? ASSISTANT:", "USER: <image>\ndescribe the picture please ASSISTANT:"]
    globalcom2.apply(model, retention_ratio=0.3, budget="exact")
    batch = make_inputs(processor, imgs, prompts)
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
    handle.remove()
    mask = seen[0][1]
    for i, (img, prompt) in enumerate(zip(imgs, prompts)):
        single = make_inputs(processor, [img], [prompt])
        n_text = int((single["input_ids"] != model.config.image_token_id).sum())
        k = globalcom2.num_image_tokens(model, (img.height, img.width))  # the patched model's own config
        assert int(mask[i].sum()) == n_text + k, i
        with torch.no_grad():
            alone = model(**single).logits[:, -1]
        assert torch.allclose(alone[0], logits[i], atol=1e-5), i
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None)
    n_prompt = batch["input_ids"].shape[1]
    for i, (img, prompt) in enumerate(zip(imgs, prompts)):
        single = make_inputs(processor, [img], [prompt])
        alone = model.generate(**single, max_new_tokens=4, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], out[i, n_prompt:]), i


# ---------------------------------------------------------------- errors


def test_content_dependent_counts_ask_for_the_exact_budget():
    cfg = tiny_config()
    dependent = [
        ("globalcom2", {}),
        ("softmax_max", {}),
        ("ntopk", {}),
        ("random", {}),
        ("globalcom2", {"allocation": "ntopk"}),
        ("drop_important_crop", {}),
        ("drop_unimportant_crop", {}),
    ]
    for name, opts in dependent:
        with pytest.raises(ValueError, match=r"depends on the image's content.*pass budget='exact'"):
            globalcom2.num_image_tokens(cfg, (300, 220), method=name, **opts)


def test_in_llm_methods_reject_the_budget(model):
    for name in IN_LLM:
        with pytest.raises(TypeError, match=rf"method '{name}' prunes inside the language model, where budget"):
            globalcom2.make_config(name, budget="exact")
        with pytest.raises(TypeError, match=r"where budget does not apply"):
            globalcom2.apply(model, method=name, budget="exact")
        with pytest.raises(ValueError, match=rf"method '{name}' prunes inside the language model"):
            globalcom2.num_image_tokens(model.config, (300, 220), method=name)
    assert not globalcom2.is_patched(model)


def test_bad_arguments_are_named():
    cfg = tiny_config()
    with pytest.raises(ValueError, match=r"budget must be one of \('authors', 'exact'\), got 'fixed'"):
        globalcom2.make_config("globalcom2", budget="fixed")
    for name in VISION:
        with pytest.raises(ValueError, match=r"budget must be one of"):
            globalcom2.make_config(name, budget=None)
    for bad in [(0, 10), (10, -1)]:
        with pytest.raises(ValueError, match=r"image_size must be a \(height, width\) pair of positive ints"):
            globalcom2.num_image_tokens(cfg, bad, budget="exact")
    for bad in [(1.5, 10), (True, 3), (1, 2, 3), "ab", None, 7]:
        with pytest.raises(TypeError, match=r"image_size must be a \(height, width\) pair"):
            globalcom2.num_image_tokens(cfg, bad, budget="exact")
    with pytest.raises(TypeError, match=r"config_or_model must be one of .*LlavaNextConfig.*got dict"):
        globalcom2.num_image_tokens(cfg.to_dict(), (10, 10), budget="exact")
    with pytest.raises(TypeError, match=r"does not take option\(s\) k"):
        globalcom2.num_image_tokens(cfg, (10, 10), k=2)
    with pytest.raises(ValueError, match=r"retention_ratio must be a finite number in \(0.0, 1.0\]"):
        globalcom2.num_image_tokens(cfg, (10, 10), retention_ratio=0, budget="exact")
    bad_cfg = tiny_config()
    bad_cfg.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match=r"vision_feature_select_strategy must be 'default'"):
        globalcom2.num_image_tokens(bad_cfg, (10, 10), budget="exact")
    assert globalcom2.num_image_tokens(cfg, torch.tensor([300, 220]), budget="exact") == globalcom2.num_image_tokens(
        cfg, [300, 220], budget="exact"
    )


def test_readme_table_formulas_for_the_other_methods():
    cfg = tiny_config()
    geo = A.Geometry.from_config(cfg)
    n_view = geo.side**2
    for i, size in enumerate(_sizes(seed=9, n=60)):
        ratio = RATIOS[i % len(RATIOS)]
        nph, npw = geo.grid(size)
        n = nph * npw
        top, bottom, left, right = core.unpadded_box((nph, npw), geo.side, size, 7)
        h = bottom - top
        n_tok = core.box_mask((top, bottom, left, right), (nph, npw), geo.side).sum(1)  # (n,) N_j
        per_crop = core.count_kept(n_tok, ratio)
        thumb = math.floor(n_view * ratio)
        rounded = min(max(1, math.floor(n_view * ratio + 0.5)), n_view)  # round() of these products: no .5 ties
        d = int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(0)))
        held = rounded if ratio >= 1 else min(rounded, geo.stock_tokens(size) // (1 + n))  # never above stock
        expected = {
            ("fastervlm", False): (1 + n) * held,
            ("fastervlm", True): thumb + int(per_crop.sum()) + h,
            ("thumbnail_only", None): thumb,
            ("crops_only", None): int(per_crop.sum()) + h,
            ("drop_random_crop", None): thumb + int(per_crop.sum() - per_crop[d]) + h,
            ("drop_important_crop", None): thumb + math.floor(ratio * int(n_tok.sum() - n_tok.max()) + 0.5) + h,
        }
        for (name, unpad), k in expected.items():
            opts = {"budget": "exact"} if name == "drop_important_crop" else {}
            if unpad is not None:
                opts["unpad"] = unpad
            got = globalcom2.num_image_tokens(cfg, size, method=name, retention_ratio=ratio, **opts)
            assert got == k, (name, unpad, size, ratio)


def test_every_vision_method_has_a_budget_option():
    assert NO_BUDGET == [] and set(NEWER) - {"dart"} <= set(VISION)
    assert "budget" in REGISTRY["dart"].option_names() and REGISTRY["dart"].where == "llm"


# ---------------------------------------------------------------- the newer methods (issue 12), real runs

NEWER_OPTIONS = [
    ("visionzip", {}),
    ("visionzip", {"contextual_share": 0.3}),
    ("divprune", {}),
    ("divprune", {"granularity": "view"}),
    ("dart", {"form": "embedding"}),
    ("dart", {"form": "embedding", "pivot_image_tokens": 2, "pivot_text_tokens": 3}),
    ("cdpruner", {}),
    ("cdpruner", {"budget": "exact", "unpad": True}),
    ("cdpruner", {"budget": "exact", "text_pooling": "tokens", "unpad": True}),
    ("composed", {"selector": "visionzip", "budget": "exact"}),
    ("composed", {"selector": "cdpruner", "allocation": "uniform", "layout": "spatial"}),
]


@pytest.mark.parametrize("name,opts", NEWER_OPTIONS)
def test_newer_methods_emit_num_image_tokens_for_any_picture(processor, name, opts):
    model = tiny_model(seed=7)
    sizes = [(300, 220), (150, 400), (500, 120), (90, 300), (40, 900), (224, 224)]
    for i, (w, h) in enumerate(sizes):
        ratio = (0.9, 0.5, 0.25, 0.1, 0.33, 1.0)[i]
        method = globalcom2.make_config(name, retention_ratio=ratio, **opts)
        expected = globalcom2.num_image_tokens(model, (h, w), method=method)
        counts = set()
        for seed in range(2):
            inputs = make_inputs(processor, [demo_image(height=h, width=w, seed=seed)])
            noise = torch.rand(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(seed))
            for pixels in (inputs["pixel_values"], noise * 4 - 2):  # a picture and pure noise
                _, recs = A.compress(model, method, pixels, inputs["image_sizes"], inputs["input_ids"])
                counts.add(recs[0].num_tokens)
        assert counts == {expected}, (name, opts, (w, h), ratio, counts)
        if name in NEWER and name != "cdpruner":  # already size-only: budget="exact" is a no-op
            assert globalcom2.num_image_tokens(model, (h, w), method=method, budget="exact") == expected


def test_newer_method_counts_are_their_formulas():
    cfg = tiny_config()
    geo = A.Geometry.from_config(cfg)
    n_view = geo.side**2
    for i, size in enumerate(_sizes(seed=11, n=60)):
        ratio = RATIOS[i % len(RATIOS)]
        nph, npw = geo.grid(size)
        n = nph * npw
        stock = geo.stock_tokens(size)
        k = min(max(1, math.floor(n_view * ratio + 0.5)), n_view)
        held = k if ratio >= 1 else min(k, stock // (1 + n))  # R < 1: at most stock's count
        assert globalcom2.num_image_tokens(cfg, size, "visionzip", retention_ratio=ratio) == (1 + n) * held
        assert globalcom2.num_image_tokens(cfg, size, "divprune", retention_ratio=ratio) == min(
            max(round(ratio * stock), 1), stock
        )
        topk = min(round(ratio * stock), stock - 4) // 8
        assert globalcom2.num_image_tokens(cfg, size, "dart", retention_ratio=ratio, form="embedding") == 4 + 8 * topk
        box = core.unpadded_box((nph, npw), geo.side, size)  # CDPruner truncates like the authors' unpad_image
        n_tok = core.box_mask(box, (nph, npw), geo.side).sum(1)
        per_view = [min(max(1, round(ratio * int(c))), int(c)) for c in [n_view, *n_tok.tolist()]]
        exact = globalcom2.num_image_tokens(cfg, size, "cdpruner", retention_ratio=ratio, budget="exact", unpad=True)
        assert exact == sum(per_view) + (box[1] - box[0]), (size, ratio)
        executed = globalcom2.num_image_tokens(cfg, size, "cdpruner", retention_ratio=ratio)  # no unpad, no newlines
        assert executed == (1 + n) * held, (size, ratio)


def test_cdpruner_exact_budget_picks_inside_the_unpadded_tokens(processor):
    model = tiny_model(seed=7)
    inputs = make_inputs(processor, [demo_image(height=120, width=500, seed=1)])  # crops with letterbox padding
    authors = globalcom2.make_config("cdpruner", retention_ratio=0.5, unpad=True)
    exact = globalcom2.make_config("cdpruner", retention_ratio=0.5, budget="exact", unpad=True)
    _, (a,) = A.compress(model, authors, inputs["pixel_values"], inputs["image_sizes"], inputs["input_ids"])
    _, (e,) = A.compress(model, exact, inputs["pixel_values"], inputs["image_sizes"], inputs["input_ids"])
    n_tok = e.valid.sum(1)
    assert e.selection.crop_keep.sum(1).tolist() == [min(max(1, round(0.5 * int(c))), int(c)) for c in n_tok]
    assert torch.equal(e.selection.thumb_keep, a.selection.thumb_keep)  # no padding in the thumbnail: theirs
    assert not (e.selection.crop_keep & ~e.valid).any() and not (a.selection.crop_keep & ~a.valid).any()
    with pytest.raises(ValueError, match=r"'cdpruner' drops the picks .* pass budget='exact'"):
        globalcom2.num_image_tokens(model, (120, 500), method=authors)


def test_dpp_greedy_candidates_and_order():
    from globalcom2.methods.cdpruner import dpp_greedy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 5, generator=g)
    kernel = x @ x.transpose(1, 2)
    full = dpp_greedy(kernel, 4, ordered=True)
    assert torch.equal(dpp_greedy(kernel, 4), full.sort(dim=1).values)
    assert torch.equal(dpp_greedy(kernel, 2, ordered=True), full[:, :2])  # prefix-consistent
    cand = torch.zeros(2, 9, dtype=torch.bool)
    cand[:, 3:7] = True
    picks = dpp_greedy(kernel, 4, cand, ordered=True)
    assert bool(((picks >= 3) & (picks < 7)).all()) and picks[0].unique().numel() == 4
    sub = dpp_greedy(kernel[:, 3:7, 3:7], 4, ordered=True) + 3  # the same greedy on the candidates alone
    assert torch.equal(picks, sub)
