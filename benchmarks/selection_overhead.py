"""Selection overhead: time of the compression step as a fraction of the vision-tower time.

Random weights shaped like CLIP-ViT-L/14-336 (24 layers, width 1024, 16 heads) under a
LLaVA-NeXT config; one 672x672-class image (thumbnail + 2x2 crops = 5 views). Both timings are
taken in the same run, interleaved, medians over repeats after a warm-up. Nothing is downloaded.

    python benchmarks/selection_overhead.py [--repeats 3] [--device cpu] [--method globalcom2 divprune ...]

The compression step is everything globalcom2 adds on top of the stock vision path: the [CLS]
row of the last layer recomputed from the hidden state entering it, the optional inputs a method
reads (VisionZip's keys, the prompt's text embeddings), the method's selection, and the gather of
the kept features (plus projecting merged tokens; the stock path would instead unpad and add
newlines). The projector maps to a 4096-wide language model (LLaVA-NeXT-7B) by default, since
DivPrune, DART and CDPruner compare projected features and their cost grows with that width; the
language model itself has one tiny-MLP layer (it is never run here). Several methods share one
vision-tower timing per repeat.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from globalcom2 import make_config
from globalcom2.models import llava_next as A
from globalcom2.models import towers
from globalcom2.testing import demo_image, tiny_model, tiny_processor

CLIP_L_336 = dict(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    """Print the compression-step / vision-tower time ratio for R in {0.75, 0.5, 0.25, 0.1}."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--method", nargs="+", default=["globalcom2"], help="one or more vision-side methods")
    ap.add_argument("--llm-hidden", type=int, default=4096, help="projector output width (default: 4096)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5, 0.25, 0.1])
    ap.add_argument("--vision-layers", type=int, default=24, help="fewer layers for a quick look (default: 24)")
    args = ap.parse_args(argv)

    shape = dict(CLIP_L_336, vision_layers=args.vision_layers, text_hidden=args.llm_hidden, text_layers=1,
                 text_heads=32, text_intermediate=64)  # fmt: skip
    model = tiny_model(seed=0, **shape).to(args.device)
    processor = tiny_processor(image_size=336, patch_size=14)
    prompt = "USER: <image>\nwhat is the color of the car on the left ? ASSISTANT:"
    inputs = processor(images=demo_image(height=672, width=672), text=prompt, return_tensors="pt").to(args.device)
    pv, sizes = inputs["pixel_values"][0], inputs["image_sizes"]
    size_list = [tuple(int(x) for x in sizes[0].tolist())]
    geo = A.Geometry.from_config(model.config)
    tower, newline = model.model.vision_tower, model.model.image_newline
    print(
        f"vision tower: CLIP-ViT-L/14-336 shape, {args.vision_layers} layers, random weights; "
        f"{pv.shape[0]} views; projector width {args.llm_hidden}; device {args.device}; methods {' '.join(args.method)}"
    )

    with torch.no_grad():

        def vision():
            out = tower(pv, output_hidden_states=True, return_dict=True)
            feats = model.model.multi_modal_projector(out.hidden_states[model.config.vision_feature_layer][:, 1:])
            return out.hidden_states, feats

        hidden, feats = vision()  # warm-up
        print(f"{'method':>12} {'R':>6} {'vision ms':>10} {'compress ms':>12} {'overhead':>9}")
        for ratio in args.ratios:
            cfgs = [make_config(m, retention_ratio=ratio) for m in args.method]

            def compress(cfg, hidden, feats):
                layer = A.score_layer(cfg, model.config.vision_feature_layer)
                scores = towers.tower_scores(tower, hidden, "cls", cfg.requires.score, layer)
                fl = model.config.vision_feature_layer
                enc = A.EncodedViews([feats], [scores], hidden, [pv.shape[0]], size_list, [fl])
                (extra,) = A.method_inputs(model, cfg, enc, inputs["input_ids"])
                rec = A.select_image(cfg, scores, size_list[0], geo, **extra)
                return A.emit(feats, rec.order, newline, A.project_extra(model, rec, feats))

            for cfg in cfgs:
                compress(cfg, hidden, feats)  # warm-up
            tv, tc = [], {cfg.name: [] for cfg in cfgs}
            for _ in range(args.repeats):
                _sync(args.device)
                t0 = time.perf_counter()
                hidden, feats = vision()
                _sync(args.device)
                tv.append(time.perf_counter() - t0)
                for cfg in cfgs:
                    t1 = time.perf_counter()
                    compress(cfg, hidden, feats)
                    _sync(args.device)
                    tc[cfg.name].append(time.perf_counter() - t1)
            v = statistics.median(tv)
            for name, times in tc.items():
                c = statistics.median(times)
                print(f"{name:>12} {ratio:>6} {v * 1e3:>10.1f} {c * 1e3:>12.2f} {c / v:>9.2%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
