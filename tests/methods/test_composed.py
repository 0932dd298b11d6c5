"""``composed``: GlobalCom²'s crop budgets (allocation=) x any per-crop selector (selector=), issue 12."""

import numpy as np
import pytest
import torch
from PIL import Image

import globalcom2
from conftest import PROMPT, encode, lm_inputs, make_inputs
from globalcom2 import core
from globalcom2.methods.composed import SELECTORS, dart_keep_exact, pivot_quota
from globalcom2.methods.visionzip import visionzip_split
from globalcom2.models import llava_next as A
from globalcom2.testing.tiny import demo_image, tiny_config, tiny_model

SIZES = [(300, 220), (150, 400), (500, 120), (224, 224)]


def _run(model, processor, cfg, img, prompt=PROMPT):
    inputs = make_inputs(processor, [img], [prompt])
    with torch.no_grad():
        feats, (rec,) = A.compress(
            model, cfg, inputs["pixel_values"], inputs["image_sizes"], inputs["input_ids"], inputs["attention_mask"]
        )
    return feats[0], rec


def _contextual(cfg, k0, k):
    """(thumbnail, (n,) crops) merged contextual tokens of the visionzip selector for counts k0, k."""
    share = cfg.option("contextual_share")
    thumb = visionzip_split(k0, share)[1] if cfg.thumbnail == "selector" else 0
    return thumb, torch.tensor([visionzip_split(int(kj), share)[1] for kj in k])


# ---------------------------------------------------------------- counts and identity


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize("allocation", ["globalcom2", "uniform"])
def test_per_crop_counts_are_globalcom2s(processor, selector, allocation):
    model = tiny_model(seed=1)
    pinned = "softmax_sum" if allocation == "globalcom2" else "uniform"
    for i, (w, h) in enumerate(SIZES):
        ratio = (0.5, 0.3, 0.1, 0.75)[i]
        img = demo_image(height=h, width=w, seed=i)
        budget = "exact" if i % 2 else "authors"
        gc = globalcom2.make_config("globalcom2", retention_ratio=ratio, allocation=pinned, budget=budget)
        cfg = globalcom2.make_config(
            "composed", retention_ratio=ratio, allocation=allocation, selector=selector, budget=budget
        )
        _, ref = _run(model, processor, gc, img)
        _, rec = _run(model, processor, cfg, img)
        want = ref.selection.crop_keep.sum(1)
        assert torch.equal(rec.selection.crop_ratios, ref.selection.crop_ratios)
        assert rec.num_tokens == ref.num_tokens, (selector, allocation, (w, h))
        got, thumb = rec.selection.crop_keep.sum(1), rec.selection.thumb_keep.numel()
        if selector == "visionzip":  # k - C dominant patches + C merged contextual tokens per view
            c0, c = _contextual(cfg, ref.selection.thumb_keep.numel(), want)
            got, thumb = got + c, thumb + c0
            assert rec.selection.extra.shape[0] == c0 + int(c.sum())
        assert torch.equal(got, want), (selector, allocation, (w, h))
        assert thumb == ref.selection.thumb_keep.numel()
        assert not (rec.selection.crop_keep & ~rec.valid).any()  # nothing from the letterbox padding


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"thumbnail": "globalcom2"},
        {"layout": "spatial", "thumbnail_order": "spatial"},
        {"budget": "exact", "alpha": 0.2},
        {"importance": "local_only", "temperature": 3.0, "score": "softmax"},
    ],
)
def test_globalcom2_selector_is_globalcom2_token_for_token(processor, options):
    model = tiny_model(seed=2)
    gc_opts = {k: v for k, v in options.items() if k != "thumbnail"}
    gc = globalcom2.make_config("globalcom2", retention_ratio=0.3, **gc_opts)
    cfg = globalcom2.make_config("composed", retention_ratio=0.3, selector="globalcom2", **options)
    for i, (w, h) in enumerate(SIZES):
        img = demo_image(height=h, width=w, seed=10 + i)
        f_ref, ref = _run(model, processor, gc, img)
        f, rec = _run(model, processor, cfg, img)
        assert torch.equal(rec.order, ref.order), (options, (w, h))
        assert torch.equal(f, f_ref)
    # and through apply: the language model receives the very same input
    inputs = make_inputs(
        processor, [demo_image(height=220, width=300, seed=1), demo_image(height=400, width=150, seed=2)], [PROMPT] * 2
    )
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        for c in (gc, cfg):
            globalcom2.apply(model, c)
            model(**inputs)
            globalcom2.remove(model)
    handle.remove()
    assert torch.equal(seen[0][0], seen[1][0]) and torch.equal(seen[0][1], seen[1][1])


def test_uniform_allocation_with_globalcom2_selector_is_the_uniform_variant(processor):
    model = tiny_model(seed=2)
    cfg = globalcom2.make_config("composed", retention_ratio=0.4, allocation="uniform")
    for w, h in SIZES[:2]:
        _, ref = _run(
            model, processor, globalcom2.make_config("uniform", retention_ratio=0.4), demo_image(height=h, width=w)
        )
        _, rec = _run(model, processor, cfg, demo_image(height=h, width=w))
        assert torch.equal(rec.order, ref.order)


# ---------------------------------------------------------------- what each selector keeps


def test_selectors_pick_inside_each_crop_by_their_own_rule(processor):
    from globalcom2.methods.cdpruner import dpp_greedy, instruction_relevance
    from globalcom2.methods.divprune import max_min_diverse

    model = tiny_model(seed=3)
    img = demo_image(height=220, width=300, seed=5)
    inputs = make_inputs(processor, [img])
    feats, scores, _ = encode(model, inputs["pixel_values"], inputs["image_sizes"])
    feats, scores = feats[0], scores[0]  # (V, N, D), (V, N)
    text = A.text_embeddings(model, inputs["input_ids"], inputs["attention_mask"], [int(inputs["input_ids"].eq(
        model.config.image_token_id).sum())])[0]  # fmt: skip
    runs = {s: _run(model, processor, globalcom2.make_config("composed", retention_ratio=0.3, selector=s), img)[1]
            for s in ("fastervlm", "divprune", "cdpruner", "dart")}  # fmt: skip
    valid = runs["divprune"].valid
    k = runs["divprune"].selection.crop_keep.sum(1)
    rel = instruction_relevance(feats, text)
    for j in range(valid.shape[0]):
        pos = valid[j].nonzero().squeeze(1)
        kj = int(k[j])
        top = pos[scores[1 + j, pos].topk(kj).indices]
        assert set(runs["fastervlm"].selection.crop_keep[j].nonzero().squeeze(1).tolist()) == set(top.tolist())
        div = pos[max_min_diverse(feats[1 + j, pos], kj)]
        assert set(runs["divprune"].selection.crop_keep[j].nonzero().squeeze(1).tolist()) == set(div.tolist())
        x = feats[1 + j, pos].float()
        x = x / x.norm(dim=-1, keepdim=True)
        kernel = rel[1 + j, pos, None] * (x @ x.t()) * rel[1 + j, None, pos]
        dpp = pos[dpp_greedy(kernel[None], kj)[0]]
        assert set(runs["cdpruner"].selection.crop_keep[j].nonzero().squeeze(1).tolist()) == set(dpp.tolist())
        dart = pos[dart_keep_exact(feats[1 + j, pos], text, kj, 4, 4)]
        assert set(runs["dart"].selection.crop_keep[j].nonzero().squeeze(1).tolist()) == set(dart.tolist())
    # thumbnail="selector": DivPrune also picks the thumbnail's int(N R); "globalcom2": its top by [CLS]
    k0 = int(core.count_kept(scores.shape[1], 0.3))
    assert runs["divprune"].selection.thumb_keep.tolist() == max_min_diverse(feats[0], k0).tolist()
    cls = globalcom2.make_config("composed", retention_ratio=0.3, selector="divprune", thumbnail="globalcom2")
    assert _run(model, processor, cls, img)[1].selection.thumb_keep.tolist() == core.top_indices(scores[0], k0).tolist()


def test_visionzip_selector_merges_the_rest_of_each_crop(processor):
    model = tiny_model(seed=3)
    cfg = globalcom2.make_config("composed", retention_ratio=0.5, selector="visionzip", contextual_share=0.25)
    feats, rec = _run(model, processor, cfg, demo_image(height=220, width=300, seed=2))
    sel = rec.selection
    n_patch = int(sel.thumb_keep.numel() + sel.crop_keep.sum())
    assert sel.extra is not None and feats.shape[0] == rec.num_tokens
    # the merged tokens come last, projected by the model's projector
    with torch.no_grad():
        projected = model.model.multi_modal_projector(sel.extra)
    torch.testing.assert_close(feats[-sel.extra.shape[0] :], projected)
    assert rec.num_tokens == n_patch + sel.extra.shape[0] + rec.grid[0] * rec.side  # + authors-layout newlines
    # dominant patches are each crop's top by [CLS] attention
    inputs = make_inputs(processor, [demo_image(height=220, width=300, seed=2)])
    _, scores, _ = encode(model, inputs["pixel_values"], inputs["image_sizes"])
    for j in range(rec.valid.shape[0]):
        pos = rec.valid[j].nonzero().squeeze(1)
        kj = int(sel.crop_keep[j].sum())
        top = pos[scores[0][1 + j, pos].topk(kj).indices]
        assert set(sel.crop_keep[j].nonzero().squeeze(1).tolist()) == set(top.tolist())


def test_dart_exact_count_and_pivot_quota():
    assert pivot_quota(10, 4).tolist() == [3, 3, 2, 2]
    assert pivot_quota(0, 3).tolist() == [0, 0, 0] and pivot_quota(5, 0).tolist() == []
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(40, 6, generator=g), torch.randn(7, 6, generator=g)
    for k in range(41):
        keep = dart_keep_exact(x, text, k, 4, 4)
        assert keep.numel() == k and keep.unique().numel() == k and torch.equal(keep, keep.sort().values)
        pivots = x.abs().sum(-1).topk(min(4, k)).indices
        assert set(pivots.tolist()) <= set(keep.tolist())  # image pivots are always kept
    assert dart_keep_exact(x, None, 9, 4, 4).numel() == 9  # no prompt: image pivots only
    # one image pivot, one text pivot, k = 3: the text pivot takes the free token least like it after the first
    x = torch.tensor([[5.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    assert dart_keep_exact(x, torch.tensor([[0.0, -1.0]]), 3, 1, 1).tolist() == [0, 2, 3]


# ---------------------------------------------------------------- options and errors


def test_invalid_combinations_are_clear_errors(model):
    with pytest.raises(ValueError, match=r"option alpha belongs to selector 'globalcom2', not to selector='divprune'"):
        globalcom2.make_config("composed", selector="divprune", alpha=0.3)
    with pytest.raises(ValueError, match=r"option text_pooling belongs to selector 'cdpruner'.*its options: none"):
        globalcom2.make_config("composed", selector="fastervlm", text_pooling="mean")
    with pytest.raises(ValueError, match=r"option contextual_share belongs to selector 'visionzip'.*alpha, importance"):
        globalcom2.make_config("composed", contextual_share=0.2)
    with pytest.raises(ValueError, match=r"selector must be one of \('globalcom2', 'fastervlm', 'cdpruner', 'div"):
        globalcom2.make_config("composed", selector="fastv")
    with pytest.raises(ValueError, match=r"allocation must be one of \('globalcom2', 'uniform'\), got 'ntopk'"):
        globalcom2.make_config("composed", allocation="ntopk")
    with pytest.raises(ValueError, match=r"thumbnail must be one of \('selector', 'globalcom2'\)"):
        globalcom2.make_config("composed", thumbnail="cls")
    with pytest.raises(ValueError, match=r"text_pooling must be one of \('mean', 'tokens'\)"):
        globalcom2.make_config("composed", selector="cdpruner", text_pooling="max")
    with pytest.raises(ValueError, match=r"contextual_share must be a finite number in \[0.0, 1.0\)"):
        globalcom2.make_config("composed", selector="visionzip", contextual_share=1.0)
    with pytest.raises(ValueError, match=r"pivot_image_tokens must be >= 1"):
        globalcom2.make_config("composed", selector="dart", pivot_image_tokens=0)
    with pytest.raises(ValueError, match=r"alpha must be a finite number in \[0.0, 1.0\]"):
        globalcom2.make_config("composed", alpha=2.0)
    with pytest.raises(TypeError, match=r"method 'composed' does not take option\(s\) granularity"):
        globalcom2.apply(model, method="composed", selector="divprune", granularity="view")
    assert not globalcom2.is_patched(model)
    cfg = globalcom2.make_config("composed", selector="cdpruner", negate=False)
    assert cfg.option("negate") is False and cfg.option("text_pooling") == "mean"
    assert cfg.needs == frozenset({"features", "text"})
    assert globalcom2.make_config("composed").needs == frozenset()


# ---------------------------------------------------------------- budgets


@pytest.mark.parametrize("selector", SELECTORS)
def test_num_image_tokens_predicts_the_run(processor, selector):
    model = tiny_model(seed=4)
    cases = [((300, 220), 0.25, "globalcom2", "exact"), ((150, 400), 0.6, "uniform", "authors"),
             ((500, 120), 0.1, "globalcom2", "exact"), ((40, 900), 0.9, "uniform", "exact")]  # fmt: skip
    for (w, h), ratio, allocation, budget in cases:
        for layout in ("authors", "spatial"):
            opts = dict(retention_ratio=ratio, allocation=allocation, selector=selector, budget=budget, layout=layout)
            cfg = globalcom2.make_config("composed", **opts)
            k = globalcom2.num_image_tokens(model.config, (h, w), method="composed", **opts)
            for seed in range(2):
                assert _run(model, processor, cfg, demo_image(height=h, width=w, seed=seed))[1].num_tokens == k, (
                    opts,
                    (w, h),
                )
    with pytest.raises(ValueError, match=r"method 'composed'.*depends on the image's content.*budget='exact'"):
        globalcom2.num_image_tokens(tiny_config(), (300, 220), method="composed", selector=selector)


# ---------------------------------------------------------------- end to end, every selector


@pytest.mark.parametrize("selector", SELECTORS)
def test_every_selector_batch_matches_alone_and_generates(processor, images, selector):
    model = tiny_model()
    prompts = [PROMPT, "USER: <image>\nhow many ? ASSISTANT:", "USER: <image>\ndescribe the picture please ASSISTANT:"]
    globalcom2.apply(model, method="composed", retention_ratio=0.5, selector=selector)
    batch = make_inputs(processor, images, prompts)
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, eos_token_id=None)
    n_prompt = batch["input_ids"].shape[1]
    assert torch.equal(out[:, :n_prompt], batch["input_ids"])
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        single = make_inputs(processor, [img], [prompt])
        alone = model.generate(**single, max_new_tokens=3, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], out[i, n_prompt:]), (selector, i)


@pytest.mark.parametrize("selector", SELECTORS)
def test_every_selector_eager_bf16_and_remove(processor, images, selector):
    model = tiny_model(attn_implementation="eager", dtype=torch.bfloat16)
    inputs = make_inputs(processor, images[:2], [PROMPT, PROMPT])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        ref = model(**inputs).logits
        globalcom2.apply(model, method="composed", retention_ratio=0.25, selector=selector, allocation="uniform")
        out = model(**inputs)
        assert out.logits.dtype == torch.bfloat16 and out.logits.isfinite().all()
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        globalcom2.remove(model)
        assert torch.equal(model(**inputs).logits, ref)


def test_viz_draws_a_composed_config(processor):
    pytest.importorskip("matplotlib")
    from globalcom2.tools import viz

    model = tiny_model()
    cfg = globalcom2.make_config("composed", selector="divprune")
    ps = viz.panels(model, processor, demo_image(height=220, width=300), methods=("composed", cfg), ratios=(0.25,))
    assert len(ps) == 2 and all(p.record.num_tokens > 0 for p in ps)


@pytest.mark.parametrize("selector", SELECTORS)
def test_odd_images_and_extreme_ratios(processor, selector):
    model = tiny_model(seed=5)
    for w, h in [(1000, 3), (3, 1000), (40, 40)]:
        for ratio in (1e-3, 1.0):
            cfg = globalcom2.make_config("composed", retention_ratio=ratio, selector=selector, budget="exact")
            gc = globalcom2.make_config("globalcom2", retention_ratio=ratio, budget="exact")
            img = Image.fromarray(np.random.default_rng(w).integers(0, 255, (h, w, 3), dtype=np.uint8))
            feats, rec = _run(model, processor, cfg, img)
            _, ref = _run(model, processor, gc, img)
            assert rec.num_tokens == ref.num_tokens == feats.shape[0], (selector, (w, h), ratio)
            assert torch.isfinite(feats).all()
            if ratio == 1.0 and selector != "visionzip":  # every unpadded token, whatever the selector
                assert torch.equal(rec.selection.crop_keep, rec.valid)


def test_bench_runs_composed(tmp_path):
    import json

    from globalcom2.tools import bench

    out = tmp_path / "b.json"
    argv = ["--tiny", "--repeats", "1", "--decode-tokens", "1", "--methods", "composed", "globalcom2",
            "--ratios", "0.5", "--json", str(out), "--quiet"]  # fmt: skip
    assert bench.main(argv) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert rows["composed"]["visual_tokens"] == rows["globalcom2"]["visual_tokens"]  # the same counts
