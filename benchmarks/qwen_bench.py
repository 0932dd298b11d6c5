"""Prefill of Qwen2.5-VL-7B-shaped random weights: stock vs every method that runs there, one 1280x720 image.

Random weights at Qwen2.5-VL-7B's widths (vision: hidden 1280, 16 heads, intermediate 3420, 112 px windows;
LM: hidden 3584, intermediate 18944, 28 heads, 4 KV heads; ``globalcom2.testing.qwen2_5_vl_7b_config``)
with few layers (default 2 vision blocks, 4 LM layers, the fewest SparseVLM's three pruning layers fit in),
and the real processor rule (patch 14, merge 2, min/max pixels 3136/12845056) with an offline tokenizer:
the image becomes 46 x 26 = 1196 visual tokens. Nothing is downloaded.

For stock and for each method at each R, the patched model's ``forward`` on the processor's output
(vision tower, the method's selection, language-model prefill; logits of the last position only, as
``generate``'s prefill) is timed; all configurations run side by side in one run, interleaved, each repeat
visiting every configuration once, medians over the repeats (``--warmup`` rounds first if asked). Reported per row: the
visual tokens entering the language model (in-LLM methods: every token enters, and the per-layer counts of
the full 28-layer model are in the Eq. 8 column), the measured time ratio against stock, and the Eq. 8
prefill-FLOPs ratio of the real 28-layer language model (``globalcom2.tools.flops``: the paper's bound on
what the LLM prefill saves; the measured ratio also carries the vision tower and the selection, and with
few LM layers the tower weighs more than in the real model).

    python benchmarks/qwen_bench.py [--repeats 3] [--threads 1] [--out docs/bench-qwen2_5_vl-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import globalcom2
from globalcom2.tools.flops import LMShape, method_prefill_flops, prefill_flops

#: (method, options) of every method that runs on Qwen-VL
METHODS = [
    ("globalcom2", {"budget": "exact"}),
    ("uniform", {"budget": "exact"}),
    ("random", {"budget": "exact"}),
    ("fastervlm", {}),
    ("visionzip", {}),
    ("divprune", {}),
    ("cdpruner", {}),
    ("dart", {"form": "embedding"}),
    ("composed", {"selector": "fastervlm", "budget": "exact"}),
    ("fastv", {}),
    ("dart", {}),
    ("sparsevlm", {"layers": (0, 1, 2)}),
]
IMAGE = (720, 1280)  # (height, width)


def build(vision_depth: int, text_layers: int):
    """(model, processor) at Qwen2.5-VL-7B's widths with few layers, random weights, the offline tokenizer."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from globalcom2.testing import qwen2_5_vl_7b_config, tiny_qwen2_5_vl_processor
    from globalcom2.testing.tiny_qwen import QWEN2_5_VL_7B_PROCESSOR

    proc = tiny_qwen2_5_vl_processor(
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
        min_pixels=QWEN2_5_VL_7B_PROCESSOR["min_pixels"], max_pixels=QWEN2_5_VL_7B_PROCESSOR["max_pixels"],
    )  # fmt: skip
    cfg = qwen2_5_vl_7b_config(vision_depth=vision_depth, text_layers=text_layers)
    tok = proc.tokenizer
    cfg.text_config.vocab_size = len(tok)  # the offline tokenizer's vocabulary (the LM head is not timed apart)
    specials = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}  # fmt: skip
    for name, token in specials.items():
        setattr(cfg, name, tok.convert_tokens_to_ids(token))
    cfg.text_config.pad_token_id = tok.pad_token_id
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    model.set_attn_implementation("sdpa")
    return model, proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0, help="warm-up rounds over every configuration (default 0)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: the machine is shared)")
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.1])
    ap.add_argument("--vision-depth", type=int, default=2)
    ap.add_argument("--text-layers", type=int, default=4)
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from globalcom2.testing import demo_image, qwen2_5_vl_7b_config, qwen_prompt

    model, proc = build(args.vision_depth, args.text_layers)
    image = demo_image(height=IMAGE[0], width=IMAGE[1], seed=0)
    inputs = proc(images=[image], text=[qwen_prompt("what is the color of the car ?")],
                  return_tensors="pt")  # fmt: skip
    stock_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    real = LMShape.from_config(qwen2_5_vl_7b_config(), name="Qwen2.5-VL-7B (28 layers)")
    configs = [("stock", {}, 1.0)] + [(m, o, r) for r in args.ratios for m, o in METHODS]

    resolved: dict[int, dict] = {}

    def run(cfg) -> tuple[float, int]:
        name, options, ratio = cfg
        if name == "stock":
            globalcom2.remove(model)
        else:
            globalcom2.apply(model, name, retention_ratio=ratio, **options)
            resolved[configs.index(cfg)] = globalcom2.get_config(model).options()  # as it runs on Qwen
        seen = []
        hook = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[1]), with_kwargs=True
        )
        try:
            with torch.no_grad():
                t0 = time.perf_counter()
                model(**inputs, logits_to_keep=1)
                dt = time.perf_counter() - t0
        finally:
            hook.remove()
        return dt, seen[0]

    times: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    lengths: dict[int, int] = {}
    for _ in range(args.warmup):  # optional warm-up rounds (a prefill here takes seconds: allocator effects vanish)
        for cfg in configs:
            run(cfg)
    for _ in range(args.repeats):  # interleaved: every repeat visits every configuration once
        for i, cfg in enumerate(configs):
            dt, lengths[i] = run(cfg)
            times[i].append(dt)
    stock_time = statistics.median(times[0])
    text_tokens = lengths[0] - stock_tokens
    rows = []
    for i, (name, options, ratio) in enumerate(configs):
        visual = lengths[i] - text_tokens  # tokens of the image entering the LM
        where = "stock" if name == "stock" else globalcom2.make_config(name, **options).where
        if name == "stock":
            flops_ratio = 1.0
        else:
            ran = {k: v for k, v in resolved[i].items() if k != "retention_ratio"}
            flops = method_prefill_flops(real, name, ratio, visual, **ran)
            flops_ratio = flops / prefill_flops(real, stock_tokens)
        rows.append({
            "method": name, "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            "where": where, "retention_ratio": ratio, "visual_tokens_in": visual,
            "prefill_s_median": round(statistics.median(times[i]), 4),
            "prefill_s": [round(t, 4) for t in times[i]],
            "time_ratio_vs_stock": round(statistics.median(times[i]) / stock_time, 3),
            "eq8_flops_ratio_28_layers": round(flops_ratio, 4),
        })  # fmt: skip
    report = {
        "what": __doc__.splitlines()[0],
        "image": {
            "width": IMAGE[1],
            "height": IMAGE[0],
            "stock_visual_tokens": stock_tokens,
            "text_tokens": text_tokens,
        },
        "model": {
            "vision_depth": args.vision_depth,
            "text_layers": args.text_layers,
            "weights": "random",
            "widths": "Qwen2.5-VL-7B (vision 1280/16 heads, LM 3584/18944, 28 heads, 4 KV heads)",
        },
        "eq8_shape": {
            "num_layers": real.num_layers,
            "hidden_size": real.hidden_size,
            "intermediate_size": real.intermediate_size,
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "note": "CPU shared with other jobs while measuring: times are noisy, ratios are side by side",
        },
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "repeats": args.repeats,
        "warmup_rounds": args.warmup,
        "rows": rows,
    }
    width = max(len(f"{r['method']} {r['options']}") for r in rows)
    print(f"{'method':<{width}}  R      visual  time ratio  Eq.8 (28 layers)")
    for r in rows:
        label = f"{r['method']} {r['options']}" if r["options"] else r["method"]
        cells = f"{r['retention_ratio']:<5}  {r['visual_tokens_in']:>6}  {r['time_ratio_vs_stock']:>10}"
        print(f"{label:<{width}}  {cells}  {r['eq8_flops_ratio_28_layers']:>16}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
