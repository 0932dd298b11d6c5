"""Where an R = 1 request's time goes in vLLM: stock LLaVA-NeXT vs the plugin, request by request.

    PYTHONPATH=src /path/to/venv-vllm/bin/python benchmarks/vllm_r1_profile.py [--requests 3] [--out FILE.json]

Both engines (stock, and the plugin at R = 1 with its default options) live in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``: engine and model in-process, so the model's methods can be
timed) on LLaVA-NeXT-7B's widths with random weights cut to 2 vision + 2 LM layers, as serve-bench's
default. Requests go one at a time, alternating stock / plugin on the same image, which goes first
alternating too (so load drift hits both alike), after one warm-up request each. Per request it times, inside the model:

* ``tower``: vision tower + projector (stock ``_process_image_pixels``; plugin ``_encode``, which also
  projects the score layer's keys for the [CLS] row);
* ``select``: what follows the tower: stock's unpad + newlines (``_merge_image_patch_embeddings``), the
  plugin's selection and gather (``image_tokens``);
* ``lm``: the model's ``forward`` calls (language model: prefill and decode steps);
* ``other``: the rest of the request's wall time (image decoding and processing, scheduling, sampling);
* ``count``: the processor's ``get_num_image_tokens`` calls (part of ``other``: how many placeholders to insert);
* ``embed``: the whole image embedding (``_process_image_input``: ``tower`` + ``select`` + glue).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

TIMES: dict[str, float] = defaultdict(float)


def _timed(cls, name: str, key: str, owner=None) -> None:
    owner = owner or cls
    fn = getattr(owner, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            TIMES[key] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    """Print (and optionally write) the per-part times of stock and R = 1 requests."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3, help="measured requests per engine")
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--tiny", action="store_true", help="the test suite's tiny model (per-request overheads dominate)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)

    import vllm.model_executor.models.llava_next as stock_mod
    from vllm import LLM, SamplingParams

    import globalcom2.integrations.vllm.llava_next as plugin_mod
    from globalcom2.integrations.vllm import ARCHITECTURE, save_llava_hf_checkpoint
    from globalcom2.integrations.vllm.bench import IMAGE_SIZES, PROMPT, model_shape
    from globalcom2.testing import demo_image, tiny_model, tiny_processor

    stock_cls, plugin_cls = (
        stock_mod.LlavaNextForConditionalGeneration,
        plugin_mod.GlobalCom2LlavaNextForConditionalGeneration,
    )
    _timed(stock_cls, "_process_image_input", "stock.embed")
    _timed(plugin_cls, "_process_image_input", "plugin.embed")
    _timed(stock_mod.LlavaNextProcessingInfo, "get_num_image_tokens", "stock.count")
    _timed(plugin_mod.GlobalCom2LlavaNextProcessingInfo, "get_num_image_tokens", "plugin.count")
    _timed(stock_cls, "_process_image_pixels", "stock.tower")
    _timed(stock_cls, "_merge_image_patch_embeddings", "stock.select")
    _timed(plugin_cls, "_encode", "plugin.tower")
    _timed(None, "image_tokens", "plugin.select", owner=plugin_mod)
    forward = stock_cls.forward

    def timed_forward(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return forward(self, *a, **k)
        finally:
            TIMES[("plugin" if isinstance(self, plugin_cls) else "stock") + ".lm"] += time.perf_counter() - t0

    stock_cls.forward = timed_forward  # the plugin class inherits it

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            model, processor, sizes = tiny_model(seed=0, text_heads=2), tiny_processor(), ((220, 300), (400, 150))
        else:
            model, processor, sizes = tiny_model(seed=0, **model_shape(2, 2)), tiny_processor(336, 14), IMAGE_SIZES
        path = save_llava_hf_checkpoint(model, processor, os.path.join(tmp, "m"))
        kw = dict(enforce_eager=True, dtype="float32", max_model_len=3200, seed=0, limit_mm_per_prompt={"image": 1})
        engines = {
            "stock": LLM(path, **kw),
            "plugin": LLM(path, hf_overrides={"architectures": [ARCHITECTURE], "globalcom2": {"retention_ratio": 1.0}},
                          **kw),
        }  # fmt: skip
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        for llm in engines.values():  # warm-up
            warm = demo_image(height=336, width=336, seed=99)
            llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": warm}}], params, use_tqdm=False)
        rows = []
        for i in range(args.requests):
            h, w = sizes[i % len(sizes)]
            img = demo_image(height=h, width=w, seed=i)
            order = list(engines.items()) if i % 2 == 0 else list(engines.items())[::-1]  # neither always first
            for name, llm in order:
                TIMES.clear()
                t0 = time.perf_counter()
                out = llm.generate([{"prompt": PROMPT, "multi_modal_data": {"image": img}}], params, use_tqdm=False)
                wall = time.perf_counter() - t0
                parts = {p: TIMES[f"{name}.{p}"] for p in ("tower", "select", "lm")}
                extra = {f"{p}_s": TIMES[f"{name}.{p}"] for p in ("embed", "count")}
                row = {"engine": name, "image_hw": [h, w], "prompt_tokens": len(out[0].prompt_token_ids),
                       "wall_s": wall, **{f"{p}_s": v for p, v in parts.items()},
                       "other_s": wall - sum(parts.values()), **extra}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = {}
    for name in engines:
        rs = [r for r in rows if r["engine"] == name]
        summary[name] = {
            k: statistics.median(r[k] for r in rs) for k in ("wall_s", "tower_s", "select_s", "lm_s", "other_s")
        }
    by = {(r["engine"], i): r for i, r in enumerate(rows) for i in [i // 2]}
    ratio = [by[("plugin", i)]["wall_s"] / by[("stock", i)]["wall_s"] for i in range(args.requests)]
    print(f"{'':8} {'wall s':>8} {'tower s':>8} {'select s':>9} {'lm s':>8} {'other s':>8}  (medians)")
    for name, s in summary.items():
        print(
            f"{name:8} {s['wall_s']:8.2f} {s['tower_s']:8.2f} {s['select_s']:9.3f} {s['lm_s']:8.2f} {s['other_s']:8.2f}"
        )
    print(f"plugin R=1 / stock wall time, request by request: {', '.join(f'{r:.3f}' for r in ratio)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "median": summary, "plugin_over_stock_wall": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
