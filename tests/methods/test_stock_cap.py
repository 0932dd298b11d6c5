"""A retention ratio below 1 never feeds the language model more visual tokens than stock: every vision-side
method, every family, any image size (thin ones too), any R in (0, 1). FasterVLM, VisionZip and CDPruner count
their budget on the padded views and GlobalCom²'s authors layout adds a newline per padded-grid row; each is
held to the stock count where that would exceed it (``core.hold_views``, ``GlobalCom2Config.hold_to_stock``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import globalcom2
from globalcom2 import core
from globalcom2.budget import stock_image_tokens
from globalcom2.methods import REGISTRY
from globalcom2.models import adapter_for
from globalcom2.testing import demo_image, tiny_config, tiny_internvl_config, tiny_onevision_config
from globalcom2.tools.flops import llava_next_config

VISION = sorted(name for name, cls in REGISTRY.items() if cls.where == "vision") + ["dart"]
#: option sets whose count depends on the image size only (the others are checked on real runs below)
SIZE_ONLY = [(name, {"form": "embedding"} if name == "dart" else {}) for name in VISION] + [
    ("globalcom2", {"budget": "exact"}),
    ("globalcom2", {"allocation": "uniform"}),  # budget="authors", layout="authors": held by hold_to_stock
    ("composed", {"allocation": "uniform"}),
    ("fastervlm", {"unpad": True}),
    ("cdpruner", {"unpad": True, "budget": "exact"}),
    ("random", {"allocation": "uniform"}),
]
CONFIGS = {
    "llava_next_7b": llava_next_config(),
    "llava_next": tiny_config(),
    "llava_onevision": tiny_onevision_config(),
    "internvl": tiny_internvl_config(),
}


def _count(config, size, name, options, ratio):
    try:
        return globalcom2.num_image_tokens(config, size, name, retention_ratio=ratio, **options)
    except ValueError as err:  # refused by the family, or a content-dependent count (checked on runs below)
        assert "not supported" in str(err) or "does not run" in str(err) or "budget='exact'" in str(err), err
        return None


sides = st.integers(1, 3000)
ratios = st.floats(1e-4, 1.0, exclude_max=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=sides, w=sides, thin=st.sampled_from([None, "wide", "tall"]), ratio=ratios)
def test_no_method_counts_more_than_stock_for_any_size(h, w, thin, ratio):
    if thin == "wide":
        h = max(1, h // 300)
    elif thin == "tall":
        w = max(1, w // 300)
    for family, config in CONFIGS.items():
        stock = stock_image_tokens(config, (h, w))
        for name, options in SIZE_ONLY:
            count = _count(config, (h, w), name, options, ratio)
            assert count is None or count <= stock, (family, name, options, (h, w), ratio, count, stock)


@pytest.mark.parametrize("size,ratio,was", [((3, 1000), 0.95, 2188), ((3, 1000), 0.5, 1152)])
def test_the_padded_view_methods_are_held_at_stock(size, ratio, was):
    """FasterVLM, VisionZip and CDPruner used to count on the padded views: 3 x 1000 px on LLaVA-NeXT-7B."""
    config = CONFIGS["llava_next_7b"]
    stock = stock_image_tokens(config, size)
    assert stock == 576
    for name in ("fastervlm", "visionzip", "cdpruner"):
        count = globalcom2.num_image_tokens(config, size, name, retention_ratio=ratio)
        assert count <= stock < was, name
        assert count == 4 * (stock // 4)  # one ceiling shared by the 4 views (thumbnail + 3 crops)
    # where the released count fits, it is kept exactly: a 672 x 672 image at R = 0.25
    assert globalcom2.num_image_tokens(config, (672, 672), "fastervlm", retention_ratio=0.25) == 5 * 144
    assert globalcom2.num_image_tokens(config, (3, 1000), "fastervlm", retention_ratio=1.0) == 4 * 576  # R = 1


def test_hold_views():
    assert core.hold_views(torch.tensor([5, 5, 5]), 20).tolist() == [5, 5, 5]  # fits: unchanged
    assert core.hold_views(torch.tensor([5, 5, 5]), 10).tolist() == [3, 3, 3]
    assert core.hold_views(torch.tensor([9, 2, 5]), 10).tolist() == [4, 2, 4]
    assert core.hold_views(torch.tensor([1, 1]), 0).tolist() == [0, 0]


def _family_inputs(name, images):
    from globalcom2.testing import (
        tiny_internvl_model,
        tiny_internvl_processor,
        tiny_model,
        tiny_onevision_model,
        tiny_onevision_processor,
        tiny_processor,
    )

    build = {
        "llava_next": (tiny_model, tiny_processor, "<image>"),
        "llava_onevision": (tiny_onevision_model, tiny_onevision_processor, "<image>"),
        "internvl": (tiny_internvl_model, tiny_internvl_processor, "<IMG_CONTEXT>"),
    }[name]
    model, processor, token = build[0](), build[1](), build[2]
    text = [" ".join([token] * len(images)) + " what is this ?"]
    fmt = {} if name == "internvl" else {"input_data_format": "channels_last"}
    nested = [images] if name == "llava_onevision" and len(images) > 1 else images
    return model, dict(processor(images=nested, text=text, return_tensors="pt", **fmt))


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision", "internvl"])
@pytest.mark.parametrize(
    "sizes", [[(3, 1000)], [(1000, 5)], [(220, 300), (400, 150)]], ids=["wide", "tall", "two-image row"]
)
def test_no_method_feeds_more_than_stock_on_real_runs(family, sizes):
    """Content-dependent counts too (GlobalCom²'s default budget, CDPruner with unpad=True), on the patched path."""
    images = [demo_image(height=h, width=w, seed=i) for i, (h, w) in enumerate(sizes)]
    model, inputs = _family_inputs(family, images)
    adapter = adapter_for(model)
    vision = {k: inputs[k] for k in adapter.vision_kwargs if k in inputs}
    for name in VISION + ["cdpruner-unpad"]:
        for ratio in (0.95, 0.999):
            options = {"form": "embedding"} if name == "dart" else {}
            if name == "cdpruner-unpad":
                name, options = "cdpruner", {"unpad": True}
            try:
                cfg = adapter.resolve(globalcom2.make_config(name, retention_ratio=ratio, **options), model.config)
            except ValueError:
                continue  # refused by the family
            with torch.no_grad():
                batch = adapter.prepare_images(
                    model, cfg, inputs["pixel_values"], vision, inputs["input_ids"], inputs.get("attention_mask")
                )
            got = [int(f.shape[0]) for f in batch.features]
            assert sum(got) <= sum(batch.stock_counts), (family, name, options, sizes, ratio, got)
            assert all(g <= s for g, s in zip(got, batch.stock_counts)), (family, name, sizes, ratio, got)
