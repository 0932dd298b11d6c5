"""Selection overhead: time of the compression step as a fraction of the vision-tower time.

Random weights shaped like CLIP-ViT-L/14-336 (24 layers, width 1024, 16 heads) under a
LLaVA-NeXT config; one 672x672-class image (thumbnail + 2x2 crops = 5 views). Both timings are
taken in the same run, interleaved, medians over repeats after a warm-up. Nothing is downloaded.

    python benchmarks/selection_overhead.py [--repeats 3] [--device cpu] [--method globalcom2]

The compression step is everything globalcom2 adds on top of the stock vision path: the [CLS]
row of the last layer recomputed from the hidden state entering it, the method's selection, and
the gather of the kept features (the stock path would instead unpad and add newlines).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from globalcom2 import make_config
from globalcom2.models import llava_next as A
from globalcom2.tiny import demo_image, tiny_model, tiny_processor

CLIP_L_336 = dict(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    """Print the compression-step / vision-tower time ratio for R in {0.75, 0.5, 0.25, 0.1}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--method", default="globalcom2")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5, 0.25, 0.1])
    ap.add_argument("--vision-layers", type=int, default=24, help="fewer layers for a quick look (default: 24)")
    args = ap.parse_args(argv)

    shape = dict(CLIP_L_336, vision_layers=args.vision_layers, text_hidden=64, text_layers=1)
    model = tiny_model(seed=0, **shape).to(args.device)
    processor = tiny_processor(image_size=336, patch_size=14)
    inputs = processor(images=demo_image(672, 672), text="<image>", return_tensors="pt").to(args.device)
    pv, sizes = inputs["pixel_values"][0], inputs["image_sizes"]
    geo = A.Geometry.from_config(model.config)
    tower, newline = model.model.vision_tower, model.model.image_newline
    print(
        f"vision tower: CLIP-ViT-L/14-336 shape, {args.vision_layers} layers, random weights; "
        f"{pv.shape[0]} views; device {args.device}; method {args.method}"
    )

    with torch.no_grad():

        def vision():
            out = tower(pv, output_hidden_states=True, return_dict=True)
            feats = model.model.multi_modal_projector(out.hidden_states[model.config.vision_feature_layer][:, 1:])
            return out.hidden_states, feats

        hidden, feats = vision()  # warm-up
        print(f"{'R':>6} {'vision ms':>10} {'compress ms':>12} {'overhead':>9}")
        for ratio in args.ratios:
            cfg = make_config(args.method, retention_ratio=ratio)

            def compress(cfg=cfg):
                layer, kind = cfg.score_source
                layer = model.config.vision_feature_layer if layer is None else layer
                scores = A._cls_scores(tower, hidden, kind, layer)
                rec = A.select_image(cfg, scores, tuple(sizes[0].tolist()), geo)
                source = torch.cat([feats.flatten(0, 1), newline[None].to(feats.dtype)], dim=0)
                return source[rec.order]

            compress()  # warm-up
            tv, tc = [], []
            for _ in range(args.repeats):
                _sync(args.device)
                t0 = time.perf_counter()
                vision()
                _sync(args.device)
                t1 = time.perf_counter()
                compress()
                _sync(args.device)
                t2 = time.perf_counter()
                tv.append(t1 - t0)
                tc.append(t2 - t1)
            v, c = statistics.median(tv), statistics.median(tc)
            print(f"{ratio:>6} {v * 1e3:>10.1f} {c * 1e3:>12.2f} {c / v:>9.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
