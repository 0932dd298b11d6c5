"""Serving benchmark: stock vLLM vs the globalcom2 plugin, offline ``LLM.generate`` under a bounded load.

    python -m globalcom2.integrations.vllm.bench [--requests 8] [--ratios 1 0.5 0.25 0.1] [--out FILE.json]

The model has LLaVA-NeXT-7B's real widths with random weights (nothing is downloaded): CLIP-ViT-L/14-336
geometry and width (1024, 16 heads) and a Vicuna-7B-shaped language model (d = 4096, m = 11008, 32 heads),
both cut to a few layers so a CPU box runs it. Each configuration gets its own engine; after one warm-up
request, N requests of mixed image sizes go in one ``generate`` call (vLLM batches them as a server
would). Reported per configuration: requests/s, mean time to first token (vLLM's own per-request
metric, from arrival), output tokens/s, mean visual tokens per request, and beside them Eq. 8's prefill
FLOPs ratio stock / compressed for those token counts (``globalcom2.flops``), the bound on the prefill
speed-up. Numbers are measurements of this machine, not assertions.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from typing import Any

from ...models.llava_next import Geometry
from ...testing import demo_image, tiny_config, tiny_model, tiny_processor
from ...tools.flops import LMShape, prefill_flops
from .checkpoint import save_llava_hf_checkpoint
from .options import ARCHITECTURE

PROMPT = "USER: <image>\nwhat is this ? ASSISTANT:"
#: (width, height) of the request images, cycled: four AnyRes grids and paddings
IMAGE_SIZES = ((480, 640), (640, 480), (330, 1000), (672, 672))  # (height, width)


def model_shape(vision_layers: int, text_layers: int) -> dict[str, Any]:
    """``tiny_config`` keywords for LLaVA-NeXT-7B's widths with the given depths."""
    return dict(
        image_size=336, patch_size=14, vision_hidden=1024, vision_layers=vision_layers, vision_heads=16,
        text_hidden=4096, text_intermediate=11008, text_layers=text_layers, text_heads=32, text_init_std=0.02,
    )  # fmt: skip


def _engine(path: str, options: dict | None, max_model_len: int):
    from vllm import LLM

    overrides = None if options is None else {"architectures": [ARCHITECTURE], "globalcom2": options}
    return LLM(
        path,
        hf_overrides=overrides,
        enforce_eager=True,
        dtype="float32",
        max_model_len=max_model_len,
        seed=0,
        limit_mm_per_prompt={"image": 1},
        disable_log_stats=False,  # per-request metrics (time to first token)
    )


def measure(llm, images: list, max_tokens: int, image_token_id: int) -> dict[str, float]:
    """One warm-up request, then all ``images`` as concurrent requests; throughput and latency."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    reqs = [{"prompt": PROMPT, "multi_modal_data": {"image": img}} for img in images]
    llm.generate(reqs[:1], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(reqs, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    ttft = [o.metrics.first_token_latency for o in outs if getattr(o, "metrics", None) is not None]
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    visual = [list(o.prompt_token_ids).count(image_token_id) for o in outs]
    return {
        "wall_s": wall,
        "requests_per_s": len(outs) / wall,
        "ttft_mean_s": sum(ttft) / len(ttft) if ttft else float("nan"),
        "output_tokens_per_s": out_tokens / wall,
        "visual_tokens_mean": sum(visual) / len(visual),
        "prompt_tokens_mean": sum(len(o.prompt_token_ids) for o in outs) / len(outs),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration in turn (stock, then the plugin at each ratio); returns the JSON document."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    shape = model_shape(args.vision_layers, args.text_layers)
    cfg = tiny_config(**shape)
    sizes = [IMAGE_SIZES[i % len(IMAGE_SIZES)] for i in range(args.requests)]  # (height, width)
    images = [demo_image(height=h, width=w, seed=i) for i, (h, w) in enumerate(sizes)]
    geo = Geometry.from_config(cfg)
    max_model_len = max(geo.stock_tokens(hw) for hw in IMAGE_SIZES) + 64 + args.max_tokens
    lm = LMShape.from_config(cfg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_llava_hf_checkpoint(tiny_model(seed=0, **shape), tiny_processor(336, 14), os.path.join(tmp, "m"))
        configs = [("stock", None)] + [
            (f"globalcom2 R={r:g}", {"method": args.method, "retention_ratio": r}) for r in args.ratios
        ]
        for name, options in configs:
            t0 = time.perf_counter()
            llm = _engine(path, options, max_model_len)
            start = time.perf_counter() - t0
            row = {"config": name, "options": options, "engine_start_s": start}
            row.update(measure(llm, images, args.max_tokens, cfg.image_token_id))
            del llm
            gc.collect()
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]
    for row in rows:
        row["requests_per_s_vs_stock"] = row["requests_per_s"] / base["requests_per_s"]
        row["ttft_vs_stock"] = row["ttft_mean_s"] / base["ttft_mean_s"]
        row["output_tokens_per_s_vs_stock"] = row["output_tokens_per_s"] / base["output_tokens_per_s"]
        t_stock, t = round(base["visual_tokens_mean"]), max(round(row["visual_tokens_mean"]), 1)
        row["eq8_prefill_flops_ratio"] = prefill_flops(lm, t_stock) / prefill_flops(lm, t)
    import vllm

    return {
        "benchmark": "vLLM offline LLM.generate, stock vs globalcom2 plugin",
        "model": (
            f"LLaVA-NeXT-7B widths, random weights, {args.vision_layers} vision + {args.text_layers} LM layers, fp32"
        ),
        "requests": args.requests,
        "image_sizes_hw": [list(IMAGE_SIZES[i % len(IMAGE_SIZES)]) for i in range(args.requests)],
        "max_tokens": args.max_tokens,
        "vllm": vllm.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "rows": rows,
    }


def format_table(doc: dict[str, Any]) -> str:
    """Markdown table of a benchmark document."""
    head = (
        "| config | visual tok/req | req/s | TTFT s | out tok/s | req/s vs stock | TTFT vs stock "
        "| Eq. 8 prefill FLOPs stock/this |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['config']} | {r['visual_tokens_mean']:.0f} | {r['requests_per_s']:.3f} | {r['ttft_mean_s']:.2f} "
        f"| {r['output_tokens_per_s']:.2f} | {r['requests_per_s_vs_stock']:.2f}x | {r['ttft_vs_stock']:.2f}x "
        f"| {r['eq8_prefill_flops_ratio']:.2f}x |"
        for r in doc["rows"]
    ]
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=8, help="concurrent requests per configuration")
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    ap.add_argument("--method", default="globalcom2")
    ap.add_argument("--max-tokens", type=int, default=16, help="greedy tokens per request")
    ap.add_argument("--vision-layers", type=int, default=2)
    ap.add_argument("--text-layers", type=int, default=2)
    ap.add_argument("--out", help="write the JSON document here")
    args = ap.parse_args(argv)
    if args.requests < 1:
        ap.error(f"--requests must be >= 1, got {args.requests}")
    if any(not 0 < r <= 1 for r in args.ratios):
        ap.error(f"--ratios must lie in (0, 1], got {args.ratios}")
    doc = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    print(format_table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
