"""Every registered vision-side method through every family: it runs and emits exactly ``num_image_tokens``
tokens (where its count depends on the image size only), or it is refused at ``apply`` with a reason.

Counts get the family's processor (``processor=``): Qwen-VL's count follows its processor's resize rule;
the other families ignore it."""

from __future__ import annotations

import pytest
import torch

import globalcom2
from globalcom2.methods import REGISTRY
from globalcom2.models import adapter_for
from globalcom2.testing import demo_image

VISION = sorted(name for name, cls in REGISTRY.items() if cls.where == "vision") + ["dart"]
SIZES = [(220, 300), (400, 150)]  # (height, width): two grids, two paddings


def _config(name: str):
    options = {"form": "embedding"} if name == "dart" else {}
    return globalcom2.make_config(name, retention_ratio=0.3, **options)


@pytest.mark.parametrize("name", VISION)
def test_every_vision_method_runs_with_its_count_or_is_refused(family, name):
    cfg = _config(name)
    try:
        globalcom2.apply(family.model, cfg)
    except ValueError as err:  # refused by the family, with the method named and a reason
        assert repr(name) in str(err) and ":" in str(err), err
        assert not globalcom2.is_patched(family.model)
        with pytest.raises(ValueError):
            globalcom2.num_image_tokens(family.model.config, SIZES[0], cfg, processor=family.processor)
        return
    images = [demo_image(height=h, width=w, seed=i) for i, (h, w) in enumerate(SIZES)]
    inputs = family.inputs(images)
    adapter = adapter_for(family.model)
    vision = {k: inputs[k] for k in adapter.vision_kwargs if k in inputs}
    running = globalcom2.get_config(family.model)
    with torch.no_grad():
        family.model(**inputs)  # the patched forward runs on the processor's output
        batch = adapter.prepare_images(
            family.model, running, inputs["pixel_values"], vision, inputs["input_ids"], inputs.get("attention_mask")
        )
    for rec, feats, size in zip(batch.records, batch.features, SIZES):
        assert feats.shape[0] == rec.num_tokens > 0
        if running.content_dependence() is None:  # a size-only count: the model emits exactly it
            count = globalcom2.num_image_tokens(family.model, size, processor=family.processor)
            assert count == rec.num_tokens, (name, size)


@pytest.mark.parametrize("name", ["divprune", "cdpruner", "fastervlm", "globalcom2", "thumbnail_only"])
def test_num_image_tokens_answers_for_every_family(family, name):
    """A size-only count for every family (InternVL's divprune/cdpruner used to raise AttributeError)."""
    options = {"budget": "exact"} if "budget" in REGISTRY[name].option_names() else {}
    cfg = globalcom2.make_config(name, retention_ratio=0.25, **options)
    if name in adapter_for(family.model).unsupported_methods:  # refused by this family (e.g. Qwen-VL: no thumbnail)
        with pytest.raises(ValueError, match=repr(name)):
            globalcom2.num_image_tokens(family.model.config, SIZES[0], cfg, processor=family.processor)
        return
    for size in SIZES:
        count = globalcom2.num_image_tokens(family.model.config, size, cfg, processor=family.processor)
        stock = globalcom2.budget.stock_image_tokens(family.model.config, size, processor=family.processor)
        assert 0 < count <= stock + 64
