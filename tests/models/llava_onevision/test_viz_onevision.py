"""globalcom2 viz on LLaVA-OneVision: the crop grid as OneVision sees it (unpadded, downscaled)."""

import torch

import globalcom2
from globalcom2.models import llava_onevision as O
from globalcom2.testing.tiny import demo_image
from globalcom2.testing.tiny_onevision import tiny_onevision_model, tiny_onevision_processor
from globalcom2.tools import viz


def test_panels_show_the_emitted_tokens_and_their_patches(tmp_path):
    model, processor = tiny_onevision_model(), tiny_onevision_processor()
    for size in [(300, 220), (150, 400), (500, 500)]:  # downscaled, plain, downscaled 6x6
        image = demo_image(height=size[1], width=size[0])
        (panel,) = viz.panels(model, processor, image, methods=("globalcom2",), ratios=(0.25,))
        rec = panel.record
        globalcom2.apply(model, retention_ratio=0.25)
        inputs = processor(images=[image], text=["<image>\nwhat ?"], return_tensors="pt")
        _, _, (live,) = O.ADAPTER.prepare_images(model, globalcom2.get_config(model), inputs["pixel_values"],
                                         {"image_sizes": inputs["image_sizes"]})  # fmt: skip
        globalcom2.remove(model)
        assert torch.equal(rec.order, live.order)  # the picture is the selection the patched model runs
        assert panel.stock_tokens == int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert panel.heat_name == "score (global_dissimilarity)"
        lay = O.Geometry.from_config(model.config).layout(size[::-1])
        top, bottom, left, right = lay.box
        assert bool(panel.crop_valid[top:bottom, left:right].all()) and int(panel.crop_valid.sum()) == (
            (bottom - top) * (right - left)
        )
        kept_tokens = int(rec.kept_per_view()[1:].sum())
        if not lay.downscaled:  # one patch, one token
            assert int(panel.crop_kept.sum()) == kept_tokens
        else:  # each kept token lights the patches it was pooled from: more patches than tokens, none in padding
            assert int(panel.crop_kept.sum()) > kept_tokens > 0
        assert not bool((panel.crop_kept & ~panel.crop_valid).any())
    out = tmp_path / "ov.png"
    assert viz.main(["--demo", "--family", "llava_onevision", "--out", str(out), "--ratio", "0.25"]) == 0
    assert out.stat().st_size > 10_000
