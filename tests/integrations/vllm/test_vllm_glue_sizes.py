"""The vLLM plugin's count and its selection agree on degenerate image sizes (no vLLM needed).

vLLM reserves ``num_image_tokens`` placeholders from the image size before the model runs; the model
must then emit exactly that many rows, or the request fails inside the engine. The serving robustness
test sends 1x1 and 8000x8000 images through a server (larger sizes
are resized to the same pinpoints); this checks the same property for more shapes,
methods and ratios at the level of the plugin's glue (``select.image_tokens``), on the tiny model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import encode
from globalcom2 import make_config, num_image_tokens
from globalcom2.integrations.vllm.select import image_tokens
from globalcom2.models import llava_next as A
from globalcom2.models import towers
from globalcom2.testing import tiny_model, tiny_processor

#: (width, height): one pixel, one-pixel lines, extreme aspect ratios, just over one view, huge
SIZES = [(1, 1), (2, 1), (1, 2), (1, 8000), (8000, 1), (2, 7999), (7999, 2), (3, 1000), (113, 1), (111, 224)]
METHODS = [("globalcom2", {"budget": "exact"}), ("fastervlm", {}), ("visionzip", {}), ("divprune", {})]
RATIOS = (1.0, 0.25, 0.1, 0.01)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model(seed=0), tiny_processor()


@pytest.mark.parametrize("wh", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_emitted_tokens_equal_the_reserved_count(tiny, wh):
    model, processor = tiny
    w, h = wh
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    inputs = processor(images=[img], text=["<image>"], return_tensors="pt", input_data_format="channels_last")
    geo = A.Geometry.from_config(model.config)
    fl = model.config.vision_feature_layer
    encoded = {}
    for name, options in METHODS:
        for r in RATIOS:
            cfg = make_config(name, retention_ratio=r, **options)
            layer, kind = cfg.requires.score_layer, cfg.requires.score
            if (layer, kind) not in encoded:
                with torch.no_grad():
                    feats, scores, sizes, hs = encode(
                        model, inputs["pixel_values"], inputs["image_sizes"], score=kind, score_layer=layer,
                        return_hidden=True,
                    )  # fmt: skip
                    n_views = [f.shape[0] for f in feats]
                    tower = model.model.vision_tower
                    keys = list(towers.layer_keys(tower, hs, fl if layer is None else layer).split(n_views))
                encoded[(layer, kind)] = feats, scores, sizes, list(hs[fl].split(n_views)), keys
            feats, scores, sizes, hidden, keys = encoded[(layer, kind)]
            with torch.no_grad():
                out = image_tokens(
                    cfg, geo, feats, scores, sizes, model.model.image_newline, model.model.multi_modal_projector,
                    hidden, keys,
                )  # fmt: skip
            k = num_image_tokens(model.config, sizes[0], cfg)
            assert out[0].shape[0] == k >= 1, (name, r, wh)
            assert torch.isfinite(out[0]).all(), (name, r, wh)
