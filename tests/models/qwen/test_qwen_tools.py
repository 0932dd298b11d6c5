"""What the tools draw on Qwen-VL: the adapter's ``view_pixels`` (the resized image as the processor fed it, the
global view and every region) and ``patch_masks``, through ``globalcom2.tools.viz.panels``."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from qwen_helpers import QWEN, _no_grad, _one_thread, prepare  # noqa: F401

import globalcom2
from globalcom2.models import adapter_for
from globalcom2.testing import qwen_prompt


def test_view_pixels_are_the_processors_pixels_cut_by_the_regions():
    model, proc = QWEN["qwen2_5_vl"][0](), QWEN["qwen2_5_vl"][1](max_pixels=(30 * 28) ** 2)
    vc = model.config.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    h, w = 12 * unit, 40 * unit  # a multiple of the factor within min/max pixels: smart_resize keeps it
    pixels = np.random.default_rng(0).integers(0, 255, (h, w, 3)).astype(np.uint8)
    inputs = proc(images=[Image.fromarray(pixels)], text=[qwen_prompt()], return_tensors="pt")
    globalcom2.apply(model, "globalcom2", retention_ratio=0.25)
    adapter = adapter_for(model)
    (rec,) = prepare(model, inputs).records
    thumb, crops = adapter.view_pixels(inputs["pixel_values"], rec)
    ip = proc.image_processor
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in (ip.image_mean, ip.image_std))
    want = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - mean) / std  # (C, H, W)
    lay = rec.layout
    assert rec.grid == lay.grid == (1, 2) and thumb.shape[-1] == lay.side * unit
    for q, (a, b) in enumerate(zip(lay.col_edges, lay.col_edges[1:])):
        block = crops[q, :, :h, : (b - a) * unit]
        assert torch.allclose(block, want[:, :, a * unit : b * unit], atol=1e-5)
    kept, content = adapter.patch_masks(rec, model.config)
    assert kept.shape == content.shape == (lay.side, 2 * lay.side)
    assert int(content.sum()) == rec.layout.n_tokens and int(kept.sum()) == rec.num_tokens


def test_viz_panels_draw_both_families():
    from globalcom2.tools import viz

    for family, (make_model, make_proc) in QWEN.items():
        model, proc = make_model(), make_proc()
        image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 300, 3)).astype(np.uint8))
        panels = viz.panels(model, proc, image, methods=("globalcom2", "divprune"), ratios=(0.3,))
        for pn in panels:
            assert pn.thumb_kept.sum() == 0  # the global view is never emitted
            assert pn.crop_kept.sum() == pn.record.num_tokens > 0, family
