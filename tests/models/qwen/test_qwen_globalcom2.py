"""GlobalCom² on a model without a thumbnail (the library's documented extension, ``docs/qwen.md``) and the
size-only counts (``budget="exact"``, ``num_image_tokens(..., processor=)``) on Qwen2.5-VL / Qwen3-VL.

* regions: ``max(1, round(H / 24))`` x ``max(1, round(W / 24))`` near-equal blocks of the merged token map;
  the global view: the map adaptive-average-pooled to S x S (S the largest block side);
* per-region budgets by GlobalCom²'s softmax rule over the global view's scores on each region; with flat
  global scores it is exactly the uniform allocation;
* nothing of the global view is emitted: R applies to the merged tokens, emitted in stock raster order;
* every size-only method's count equals what the model emits, for many sizes and random pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from qwen_helpers import QWEN, _no_grad, _one_thread, prepare, qwen_batch  # noqa: F401

import globalcom2
from globalcom2.methods import GlobalCom2Config
from globalcom2.models import qwen_common as qc
from globalcom2.testing import (
    QWEN2_5_VL_7B_PROCESSOR,
    QWEN3_VL_8B_PROCESSOR,
    qwen2_5_vl_7b_config,
    qwen3_vl_8b_config,
    qwen_prompt,
)

# ------------------------------------------------------------------------------------ regions and global view


@pytest.mark.parametrize(
    "merged,grid,side",
    [
        ((26, 46), (1, 2), 26),
        ((72, 72), (3, 3), 24),
        ((2, 2), (1, 1), 2),
        ((36, 12), (2, 1), 18),
        ((5, 130), (1, 5), 26),
    ],
)
def test_region_rule(merged, grid, side):
    lay = qc.RegionLayout.of(merged)
    assert lay.grid == grid and lay.side == side
    h, w = merged
    assert lay.row_edges[0] == 0 and lay.row_edges[-1] == h and lay.col_edges[-1] == w
    sizes = np.diff(lay.row_edges).tolist() + np.diff(lay.col_edges).tolist()
    assert max(np.diff(lay.row_edges)) - min(np.diff(lay.row_edges)) <= 1 and min(sizes) >= 1
    # every merged token sits in exactly one slot, and the stock order lists them in raster order
    slots, valid = lay.slots()
    assert sorted(slots[valid].tolist()) == list(range(h * w))
    assert torch.equal(qc.context_to_stock(lay)[lay.stock_order()], torch.arange(h * w))


def test_global_view_is_the_pooled_map():
    lay = qc.RegionLayout.of((26, 46))
    ramp = torch.arange(26 * 46, dtype=torch.float32)
    pooled = lay.global_view(ramp)
    want = torch.nn.functional.adaptive_avg_pool2d(ramp.view(1, 1, 26, 46), (26, 26)).flatten()
    assert torch.equal(pooled, want)
    assert torch.equal(lay.global_view(torch.ones(26 * 46)), torch.ones(26 * 26))


def test_flat_global_scores_give_the_uniform_allocation():
    """Eq. 2-6 on a flat global view: every region's ratio is R (to float rounding: the softmax of equal sums),
    so each region keeps what ``allocation="uniform"`` keeps; under ``budget="exact"`` the shared total is the same
    and a region may differ by the one token a tie of the largest-remainder split gives another."""
    for merged in [(26, 46), (36, 12), (50, 75)]:
        lay = qc.RegionLayout.of(merged)
        local = torch.rand(lay.n_tokens, generator=torch.Generator().manual_seed(0))
        ctx = qc.region_context(lay, torch.ones(lay.n_tokens))
        ctx.scores[1:] = qc.region_context(lay, local).scores[1:]  # local scores vary, the global view is flat
        for budget in ("authors", "exact"):
            cfg = GlobalCom2Config(retention_ratio=0.3, budget=budget, layout="spatial")
            ratios = cfg.crop_ratios(ctx)
            assert torch.allclose(ratios, torch.full_like(ratios, 0.3), atol=1e-12, rtol=0)
            uni = GlobalCom2Config(retention_ratio=0.3, budget=budget, layout="spatial", allocation="uniform")
            ours, theirs = cfg.select(ctx).crop_keep, uni.select(ctx).crop_keep
            if budget == "authors":
                assert torch.equal(ours, theirs)
            else:
                assert int(ours.sum()) == int(theirs.sum())
                assert int((ours.sum(1) - theirs.sum(1)).abs().max()) <= 1
                same = ours.sum(1) == theirs.sum(1)
                assert torch.equal(ours[same], theirs[same])


def test_flat_tower_attention_gives_the_uniform_allocation_on_the_model():
    """The tiny model with a scoring block whose queries are zero (uniform attention): GlobalCom²'s regions get R
    each and keep exactly the tokens ``uniform`` keeps."""
    model, proc = QWEN["qwen3_vl"][0](), QWEN["qwen3_vl"][1](max_pixels=(30 * 32) ** 2)
    qkv = model.model.visual.blocks[-1].attn.qkv
    d = qkv.weight.shape[1]
    qkv.weight[:d].zero_()
    qkv.bias[:d].zero_()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (900, 1400, 3)).astype(np.uint8))
    inputs = proc(images=[image], text=[qwen_prompt()], return_tensors="pt")
    globalcom2.apply(model, "globalcom2", retention_ratio=0.3)
    (rec,) = prepare(model, inputs).records
    assert rec.grid[0] * rec.grid[1] > 1
    assert torch.allclose(rec.selection.crop_ratios, torch.full((rec.grid[0] * rec.grid[1],), 0.3, dtype=torch.float64))
    globalcom2.apply(model, "uniform", retention_ratio=0.3)
    (uni,) = prepare(model, inputs).records
    assert torch.equal(rec.tokens.index, uni.tokens.index)


def test_regions_with_more_global_attention_keep_more():
    lay = qc.RegionLayout.of((20, 60))  # 1 x 3 regions
    scores = torch.ones(20, 60)
    scores[:, 40:] = 3.0  # the right region holds the global attention
    ctx = qc.region_context(lay, scores.flatten())
    ratios = GlobalCom2Config(retention_ratio=0.3, layout="spatial").crop_ratios(ctx)
    assert ratios[2] > ratios[0] and torch.isclose(ratios[0], ratios[1])


def test_no_global_view_token_is_emitted_and_order_is_raster(qwen):
    _, model, proc = qwen
    inputs = qwen_batch(proc)
    globalcom2.apply(model, "globalcom2", retention_ratio=0.3, budget="exact")
    batch = prepare(model, inputs)
    for rec, n in zip(batch.records, batch.stock_counts):
        assert not bool(rec.kept[0].any())  # the pooled global view is never emitted
        assert rec.num_tokens == int(np.floor(0.3 * n + 0.5))  # R of the merged tokens
        idx = rec.tokens.index
        assert bool((idx[1:] > idx[:-1]).all())


# ------------------------------------------------------------------------------------------- exact counts

SIZE_ONLY = [
    ("globalcom2", {"budget": "exact"}),
    ("uniform", {}),
    ("softmax_max", {"budget": "exact"}),
    ("random", {"budget": "exact"}),
    ("fastervlm", {}),
    ("fastervlm", {"unpad": True}),
    ("divprune", {}),
    ("divprune", {"granularity": "view"}),
    ("cdpruner", {}),
    ("visionzip", {}),
    ("dart", {"form": "embedding"}),
    ("composed", {"selector": "fastervlm", "budget": "exact"}),
    ("composed", {"selector": "dart", "budget": "exact"}),
]


@pytest.mark.parametrize("family", list(QWEN))
def test_counts_equal_what_the_model_emits_for_any_pixels(family):
    model, proc = QWEN[family][0](), QWEN[family][1](max_pixels=(12 * 32) ** 2)
    rng = np.random.default_rng(1)
    sizes = [(40, 40), (300, 220), (100, 700), (700, 90), (333, 333), (64, 500), (512, 384), (90, 160)]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8)) for h, w in sizes]
    inputs = proc(images=images, text=[qwen_prompt(n_images=len(images))], return_tensors="pt")
    for name, options in SIZE_ONLY:
        for ratio in (0.1, 0.37):
            globalcom2.apply(model, name, retention_ratio=ratio, **options)
            batch = prepare(model, inputs)
            for size, rec, feats in zip(sizes, batch.records, batch.features):
                count = globalcom2.num_image_tokens(model.config, size, name, processor=proc, retention_ratio=ratio,
                                                    **options)  # fmt: skip
                assert count == rec.num_tokens == feats.shape[0], (name, options, ratio, size)
    for size, n in zip(sizes, prepare(model, inputs).stock_counts):
        assert globalcom2.budget.stock_image_tokens(model.config, size, processor=proc) == n


def test_count_needs_the_processor_and_refuses_content_dependent_budgets(qwen):
    _, model, proc = qwen
    with pytest.raises(ValueError, match="processor is required"):
        globalcom2.num_image_tokens(model.config, (200, 300), "globalcom2", budget="exact")
    with pytest.raises(ValueError, match="budget='exact'"):
        globalcom2.num_image_tokens(model.config, (200, 300), "globalcom2", processor=proc)
    with pytest.raises(ValueError, match="patch_size"):
        globalcom2.num_image_tokens(model.config, (200, 300), "uniform", processor={**QWEN3_VL_8B_PROCESSOR,
                                                                                    "patch_size": 7})  # fmt: skip
    # a processor, its image processor and a mapping of its settings count alike
    ip = proc.image_processor
    settings = {"min_pixels": ip.size["shortest_edge"], "max_pixels": ip.size["longest_edge"]}
    counts = {
        globalcom2.num_image_tokens(model.config, (200, 300), "uniform", processor=p) for p in (proc, ip, settings)
    }
    assert len(counts) == 1


@pytest.mark.parametrize(
    "config,processor,stock,r25,r10",
    [
        (qwen2_5_vl_7b_config, QWEN2_5_VL_7B_PROCESSOR, 1196, 299, 120),  # 1280x720 -> 1288x728 px -> 46 x 26
        (qwen3_vl_8b_config, QWEN3_VL_8B_PROCESSOR, 880, 220, 88),  # 1280x720 -> 1280x704 px -> 40 x 22
    ],
)
def test_real_checkpoint_geometry(config, processor, stock, r25, r10):
    cfg = config()
    size = (720, 1280)  # (height, width)
    assert globalcom2.budget.stock_image_tokens(cfg, size, processor=processor) == stock
    for ratio, want in ((0.25, r25), (0.1, r10)):
        assert globalcom2.num_image_tokens(cfg, size, "globalcom2", processor=processor, retention_ratio=ratio,
                                           budget="exact") == want  # fmt: skip
    assert qc.RegionLayout.of(qc.resize_rule(processor, cfg, "qwen").merged(size)).grid == (1, 2)
