"""``globalcom2 serve-bench``: stock vLLM vs the globalcom2 plugin behind ``vllm serve``, under concurrent load.

Run (vLLM's interpreter; the servers are children of it and inherit ``PYTHONPATH``)::

    globalcom2 serve-bench [--ratios 1 0.25 0.1] [--concurrency 1 4 16] [--repeats 3]
                           [--out serve-bench.json] [--plot serve-bench.png]
    globalcom2 serve-bench --smoke                 # tiny model, 1 round, concurrency 1 and 4: proves it runs
    globalcom2 serve-bench --from-json serve-bench.json --plot serve-bench.png   # redraw a saved run, no vLLM

What runs. A checkpoint with random weights is built in a temporary directory (``--family``:
``llava_next``, LLaVA-NeXT-7B's widths, CLIP-ViT-L/14-336 tower and a Vicuna-7B-shaped language model;
``llava_onevision``, SigLIP-so400m at 384 px and a Qwen2-7B-wide LM; ``internvl``, InternViT-300M at
448 px and a Qwen2.5-7B-wide LM; ``qwen2_5_vl``, Qwen2.5-VL-7B's windowed ViT and min/max pixels and a
7B-wide LM; cut to ``--vision-layers`` / ``--text-layers`` layers; ``--smoke`` uses the family's tiny
test model). One
``vllm serve`` per configuration, on 127.0.0.1 at a free port: ``stock`` (vLLM's own model class) and the
plugin at each ratio (``--method`` at ``retention_ratio`` R; R = 1 runs the whole plugin path, selection
included, keeping every token). Prefix caching and the multimodal processor cache are off and every
request carries an image of its own (the same images, in the same order, go to every configuration),
so no configuration is served from a cache. After a warm-up (one request per image size) each
configuration gets, per concurrency level c, ``--requests`` chat-completion requests (default
max(8, 2c)) with base64 PNG data URLs of mixed sizes, at most c in flight (asyncio + httpx),
streamed so that the first token's arrival is timed by the client; every request decodes exactly
``--max-tokens`` greedy tokens (``ignore_eos``).

Interleaving (why the numbers can be compared). Load from other jobs drifts over minutes, so a
configuration measured after another sees a different machine. With ``--launch together`` (chosen by
``auto`` when the servers fit in memory) every configuration's server is up for the whole run and the
cells alternate in time: a round visits, for each c, every configuration back to back, in an order
rotated from one (round, c) to the next, so no configuration is always first or last and drift hits
all alike; each server is started (and warmed) once. Idle servers hold memory but hardly any CPU; the
CPU seconds the other servers used during a cell are recorded (``background_cpu_s``) so this is
checked, not assumed. ``--launch per-round`` (chosen when they do not fit) starts one server at a time,
each round visiting every configuration in a rotated order, restarting it every round. ``--repeats``
rounds give every number a spread. Ratios against stock are taken per round (stock and the
configuration measured minutes apart in the same round), then summarised.

Columns (markdown table, one row per configuration and concurrency; "m [lo-hi]" is the median over
rounds and the min-max range; a single round prints the value alone):

* ``prompt tok``, ``visual tok``: mean prompt tokens per request as the server reports them
  (``return_token_ids``), and how many of them are image placeholders: what vLLM prefills and caches;
* ``req/s``: requests completed / wall time of the cell (first send to last byte);
* ``TTFT p50``, ``TTFT p95`` (s): client-side time from sending a request to the first streamed chunk
  carrying a generated token (queueing, image decoding, vision tower, selection and prefill included);
* ``out tok/s``: generated tokens / wall time of the cell;
* ``req/s x``, ``TTFT x``: speed-up over stock in the same round, req/s this / stock and TTFT p50
  stock / this;
* ``Eq. 8``: the paper's prefill-FLOPs bound stock / this, sum_i F(T_stock,i) / sum_i F(T_i) over the
  cell's requests with F = ``globalcom2.tools.flops.prefill_flops`` on the checkpoint's ``LMShape`` and T the
  visual tokens measured above (Eq. 8 counts the language model's visual tokens only: the text, the
  vision tower and the per-request costs are not in it, and L cancels, so it is the same bound for the
  cut and the full-depth model);
* ``req/s x / Eq. 8``, ``TTFT x / Eq. 8``: measured speed-up over the bound. Near 1: the language
  model's prefill dominates as Eq. 8 assumes; below 1: costs the compression does not shrink (vision
  tower, image decoding, decode steps, HTTP) take a share, which grows when the model is cut to a few
  layers as here; above 1: effects outside Eq. 8 (the KV cache fits more requests at once, smaller
  attention).

The JSON (``--out``) holds the setup, every round of every cell (per-request visual-token counts
included) and the summaries; ``--plot`` draws req/s, TTFT p50, out tok/s and the speed-up against
the bound versus concurrency (needs matplotlib: ``pip install "globalcom2[viz]"``).

R = 1 against stock. Both prefill the same prompts (same token counts, checked: the R = 1 row's
``prompt tok`` equals stock's). The plugin adds, per image, the score layer's key projection of every
tower token (about 1/12 of one CLIP layer), the [CLS] attention and the selection; everything else
(tower, projector, language model, scheduler) is vLLM's. Profiled (``benchmarks/vllm_r1_profile.py``,
``docs/serve-bench.md``): at LLaVA-NeXT-7B widths that is within ~2 % of a stock request, while the
language model alone, same tokens, took 17.6-46.7 s from one minute to the next on the shared
machine; ``bench.py``'s one-shot, sequential R = 1 row (1.29x stock, same 2440 tokens) measured that
load, not the plugin. On the tiny model the fixed per-image cost is ~5 % of a request; a per-request
re-parse of the options in the processor's count (3-15 ms) was a defect and is fixed.

Numbers are measurements of the machine they ran on; the smoke run only shows that the tool works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...tools.flops import LMShape, prefill_flops, processor_settings
from .options import ARCHITECTURE
from .server import LLAVA_CHAT_TEMPLATE, Server, ServerError, chat_body, data_url, free_port, image_bytes, serve_command

PROG = "globalcom2 serve-bench"
TEXT = "what is this ?"
SERVED_NAME = "bench"


# --------------------------------------------------------------------------------------------
# model families: one entry each
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """What serve-bench needs of a model family: a checkpoint builder, the prompt format and the image token.

    build(path, smoke, vision_layers, text_layers) writes a random-weight checkpoint at ``path`` (config,
    weights, processor, tokenizer) and returns its transformers config; chat_template renders the
    OpenAI messages into the family's prompt format; image_token is the placeholder the processor expands
    (its id, ``config.image_token_id``, is what the visual tokens are counted by); architecture is the
    plugin's architecture name for ``--hf-overrides``; stock_tokens(config, (h, w), processor) is stock's
    visual-token count (it sizes ``--max-model-len``; processor: the checkpoint's saved image-processor
    settings, which the Qwen-VL counts need); sizes / smoke_sizes are the (height, width) request images, cycled;
    widths names the real checkpoint whose widths the full-size build takes.
    """

    build: Callable[[str, bool, int, int], Any]
    chat_template: str
    image_token: str
    architecture: str
    stock_tokens: Callable[[Any, tuple[int, int], Any], int]
    sizes: tuple[tuple[int, int], ...]
    smoke_sizes: tuple[tuple[int, int], ...]
    widths: str = ""  # what the full-size (not --smoke) checkpoint is shaped like, for the JSON's "model"


def _build_llava_next(path: str, smoke: bool, vision_layers: int, text_layers: int):
    from ...testing import tiny_model, tiny_processor
    from .bench import model_shape
    from .checkpoint import save_llava_hf_checkpoint

    if smoke:  # the test suite's tiny model (head_dim 32: the smallest vLLM's CPU attention takes)
        model, processor = tiny_model(seed=0, text_heads=2), tiny_processor()
    else:
        model, processor = tiny_model(seed=0, **model_shape(vision_layers, text_layers)), tiny_processor(336, 14)
    save_llava_hf_checkpoint(model, processor, path)
    return model.config


def _llava_next_stock_tokens(config, size: tuple[int, int], processor=None) -> int:
    from ...models.llava_next import Geometry

    return Geometry.from_config(config).stock_tokens(size)


def _stock_tokens(config, size: tuple[int, int], processor=None) -> int:
    from ...budget import stock_image_tokens

    return stock_image_tokens(config, size, processor=processor)


def _build_onevision(path: str, smoke: bool, vision_layers: int, text_layers: int):
    from ...testing import tiny_onevision_model, tiny_onevision_processor
    from .checkpoint import save_vllm_checkpoint

    if smoke:
        model, processor = tiny_onevision_model(seed=0, text_heads=2), tiny_onevision_processor()
    else:  # LLaVA-OneVision-7B's widths: SigLIP-so400m at 384 px / 14 px patches, a Qwen2-7B-wide LM
        shape = dict(image_size=384, patch_size=14, vision_hidden=1152, vision_layers=vision_layers, vision_heads=16,
                     text_hidden=3584, text_layers=text_layers, text_heads=28, text_init_std=0.02)  # fmt: skip
        model, processor = tiny_onevision_model(seed=0, **shape), tiny_onevision_processor(384, 14)
    save_vllm_checkpoint(model, processor, path)
    return model.config


def _build_internvl(path: str, smoke: bool, vision_layers: int, text_layers: int):
    from ...testing import tiny_internvl_model, tiny_internvl_processor
    from .checkpoint import save_vllm_checkpoint

    if smoke:
        model, processor = tiny_internvl_model(seed=0, text_heads=2), tiny_internvl_processor()
    else:  # InternVL3-8B's widths: InternViT-300M at 448 px / 14 px patches, a Qwen2.5-7B-wide LM
        shape = dict(image_size=448, patch_size=14, vision_hidden=1024, vision_layers=vision_layers, vision_heads=16,
                     text_hidden=3584, text_layers=text_layers, text_heads=28, text_init_std=0.02)  # fmt: skip
        model, processor = tiny_internvl_model(seed=0, **shape), tiny_internvl_processor(448, 14)
    save_vllm_checkpoint(model, processor, path)
    return model.config


def _build_qwen2_5_vl(path: str, smoke: bool, vision_layers: int, text_layers: int):
    from ...testing import tiny_qwen
    from .checkpoint import save_vllm_checkpoint

    if smoke:
        model, processor = tiny_qwen.tiny_qwen2_5_vl_model(seed=0, text_heads=2), tiny_qwen.tiny_qwen2_5_vl_processor()
    else:  # Qwen2.5-VL-7B's widths: its ViT (1280 wide, 16 heads, 112 px windows, last block full), a 7B-wide LM
        shape = dict(vision_hidden=1280, vision_depth=vision_layers, vision_heads=16, window_size=112,
                     fullatt_block_indexes=(vision_layers - 1,), text_hidden=3584, text_layers=text_layers,
                     text_heads=28, text_kv_heads=4, text_init_std=0.02)  # fmt: skip
        pixels = {k: tiny_qwen.QWEN2_5_VL_7B_PROCESSOR[k] for k in ("min_pixels", "max_pixels")}
        model, processor = (
            tiny_qwen.tiny_qwen2_5_vl_model(seed=0, **shape),
            tiny_qwen.tiny_qwen2_5_vl_processor(**pixels),
        )
    save_vllm_checkpoint(model, processor, path)
    return model.config


#: ChatML, as the Qwen-VL chat templates render a user turn with images then text
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def _chat_template(image: str) -> str:
    """A USER/ASSISTANT template putting ``image`` where each image item of the user turn is."""
    return (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
        "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}" + image + "\n{% endif %}{% endfor %}"
        " ASSISTANT:{% endif %}{% endfor %}"
    )


FAMILIES: dict[str, Family] = {
    "llava_next": Family(
        build=_build_llava_next,
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
        architecture=ARCHITECTURE,
        stock_tokens=_llava_next_stock_tokens,
        sizes=((480, 640), (640, 480), (330, 1000), (672, 672)),  # four AnyRes grids and paddings
        smoke_sizes=((220, 300), (400, 150), (120, 500), (224, 224)),  # the same for the 112-px tiny model
        widths="LLaVA-NeXT-7B",
    ),
    "llava_onevision": Family(
        build=_build_onevision,
        chat_template=_chat_template("<image>"),
        image_token="<image>",
        architecture="GlobalCom2LlavaOnevisionForConditionalGeneration",
        stock_tokens=_stock_tokens,
        sizes=((480, 640), (640, 480), (330, 1000), (768, 768)),
        smoke_sizes=((220, 300), (400, 150), (120, 500), (180, 180)),
        widths="LLaVA-OneVision-7B (LM intermediate 2d)",
    ),
    "internvl": Family(
        build=_build_internvl,
        chat_template=_chat_template("<IMG_CONTEXT>"),
        image_token="<IMG_CONTEXT>",
        architecture="GlobalCom2InternVLForConditionalGeneration",
        stock_tokens=_stock_tokens,
        sizes=((480, 640), (640, 480), (330, 1000), (896, 896)),
        smoke_sizes=((220, 300), (400, 150), (120, 500), (224, 224)),
        widths="InternVL3-8B (LM intermediate 2d)",
    ),
    "qwen2_5_vl": Family(
        build=_build_qwen2_5_vl,
        chat_template=QWEN_CHAT_TEMPLATE,
        image_token="<|image_pad|>",
        architecture="GlobalCom2Qwen2_5_VLForConditionalGeneration",
        stock_tokens=_stock_tokens,
        sizes=((480, 640), (640, 480), (330, 1000), (720, 1280)),  # native resolution: 391, 391, 432, 1196 tokens
        smoke_sizes=((220, 300), (400, 150), (120, 500), (180, 180)),
        widths="Qwen2.5-VL-7B (LM intermediate 2d)",
    ),
}


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block, no traceback), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_list(flag: str, values: list[str], low: int = 1) -> list[int]:
    out = []
    for v in values:
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"{flag} {v}: must be a whole number >= {low}") from None
        if n < low:
            raise ValueError(f"{flag} {v}: must be a whole number >= {low}")
        out.append(n)
    return out


def _ratios(values: list[str]) -> list[float]:
    out = []
    for v in values:
        try:
            r = float(v)
        except ValueError:
            raise ValueError(f"--ratios {v}: retention_ratio must be a number in (0, 1]") from None
        if not math.isfinite(r) or not 0 < r <= 1:
            raise ValueError(f"--ratios {v}: retention_ratio must be in (0, 1]")
        out.append(r)
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parsed and checked arguments; a bad one exits with one line naming the flag."""
    ap = _Parser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="llava_next", help=f"model family ({', '.join(FAMILIES)})")
    ap.add_argument("--method", default="globalcom2", help="compression method the plugin serves")
    ap.add_argument("--ratios", nargs="+", default=None, help="retention ratios R in (0, 1] (default 1 0.25 0.1)")
    ap.add_argument("--concurrency", nargs="+", default=None, help="requests in flight (default 1 4 16)")
    ap.add_argument("--repeats", default=None, help="rounds; each visits every configuration (default 3)")
    ap.add_argument("--requests", default=None, help="requests per configuration, level and round (default max(8, 2c))")
    ap.add_argument("--max-tokens", default="16", help="greedy tokens per request (default 16)")
    ap.add_argument("--vision-layers", default="2", help="vision layers of the checkpoint (default 2; 24 is CLIP-L)")
    ap.add_argument("--text-layers", default="2", help="language-model layers (default 2; 32 is Vicuna-7B)")
    ap.add_argument("--launch", default="auto", choices=["auto", "together", "per-round"],
                    help="all servers up at once, or one at a time, restarted every round (auto: together if "
                         "they fit in memory)")  # fmt: skip
    ap.add_argument("--kv-cache-gib", default=None, help="VLLM_CPU_KVCACHE_SPACE per server (default 4; smoke 1)")
    ap.add_argument(
        "--settle-s", default="2", help="pause before every cell, so the last server's tail-off ends (default 2)"
    )
    ap.add_argument("--start-timeout", default="900", help="seconds a server may take to answer /health")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs vllm serve (default this one)")
    ap.add_argument("--out", help="write the JSON document here")
    ap.add_argument("--plot", metavar="PNG", help="draw the results here (needs matplotlib)")
    ap.add_argument("--log-dir", help="keep the servers' logs here (default: a temporary directory)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 round, concurrency 1 and 4, 4 requests")
    ap.add_argument("--from-json", metavar="FILE", help="run nothing: print the table (and --plot) of a saved --out")
    args = ap.parse_args(argv)
    try:
        _check(args)
    except ValueError as err:
        ap.error(str(err))
    return args


def _check(args: argparse.Namespace) -> None:
    smoke = args.smoke
    if args.family not in FAMILIES:
        raise ValueError(f"--family {args.family}: must be one of {', '.join(FAMILIES)}")
    args.ratios = _ratios(args.ratios or ["1", "0.25", "0.1"])
    levels = args.concurrency or (["1", "4"] if smoke else ["1", "4", "16"])
    args.concurrency = sorted(set(_int_list("--concurrency", levels)))
    args.repeats = _int_list("--repeats", [args.repeats or ("1" if smoke else "3")])[0]
    args.requests = None if args.requests is None else _int_list("--requests", [args.requests])[0]
    if smoke and args.requests is None:
        args.requests = 4
    args.max_tokens = _int_list("--max-tokens", [args.max_tokens])[0]
    args.vision_layers = _int_list("--vision-layers", [args.vision_layers])[0]
    args.text_layers = _int_list("--text-layers", [args.text_layers])[0]
    args.start_timeout = _int_list("--start-timeout", [args.start_timeout])[0]
    args.settle_s = _int_list("--settle-s", [args.settle_s], low=0)[0]
    kv = args.kv_cache_gib or ("1" if smoke else "4")
    try:
        args.kv_cache_gib = float(kv)
    except ValueError:
        args.kv_cache_gib = -1.0
    if not math.isfinite(args.kv_cache_gib) or args.kv_cache_gib <= 0:
        raise ValueError(f"--kv-cache-gib {kv}: must be a number of GiB > 0")
    _check_method(args)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError(f'--plot {args.plot}: needs matplotlib (pip install "globalcom2[viz]")') from None
    for flag in ("out", "plot"):
        path = getattr(args, flag)
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"--{flag} {path}: its directory does not exist")
    if args.from_json:
        if not os.path.isfile(args.from_json):
            raise ValueError(f"--from-json {args.from_json}: no such file")
        return  # nothing is served
    if args.python == sys.executable:
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError(f"--python {args.python}: vllm is not importable (scripts/vllm-setup.sh installs it)")
    elif not shutil.which(args.python) and not os.access(args.python, os.X_OK):
        raise ValueError(f"--python {args.python}: not an executable")
    try:
        import httpx  # noqa: F401
    except ImportError:
        raise ValueError("serve-bench drives the servers with httpx, not installed here (vLLM brings it)") from None


def _check_method(args: argparse.Namespace) -> None:
    """Every (method, ratio) through the plugin's own option check, on the tiny config (no weights built)."""
    from ...testing import tiny_config
    from .options import method_config

    cfg = tiny_config()
    for r in args.ratios:
        cfg.globalcom2 = {"method": args.method, "retention_ratio": r}
        try:
            method_config(cfg)
        except (ValueError, TypeError) as err:
            raise ValueError(f"--method {args.method}: {err}") from None


# --------------------------------------------------------------------------------------------
# the load
# --------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min and max of per-round values (NaNs left out), and the values."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "values": list(values)}
    return {"median": _percentile(vals, 50), "min": min(vals), "max": max(vals), "values": list(values)}


async def _one(client, url: str, body: dict, image_token_id: int) -> dict[str, Any]:
    """One streamed request: TTFT, latency, prompt / visual / generated token counts, or the error."""
    rec: dict[str, Any] = {"ok": False}
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", url, json={**body, "stream": True}) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                rec.update(status=r.status_code, error=text[:500])
                return rec
            prompt_ids, n_out, ttft = None, 0, None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data.strip() == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("prompt_token_ids") is not None:
                    prompt_ids = chunk["prompt_token_ids"]
                for choice in chunk.get("choices") or []:
                    ids = choice.get("token_ids") or []
                    if ids and ttft is None:
                        ttft = time.perf_counter() - t0
                    n_out += len(ids)
        rec.update(
            ok=prompt_ids is not None and n_out > 0,
            ttft_s=ttft,
            latency_s=time.perf_counter() - t0,
            prompt_tokens=None if prompt_ids is None else len(prompt_ids),
            visual_tokens=None if prompt_ids is None else prompt_ids.count(image_token_id),
            completion_tokens=n_out,
        )
        if not rec["ok"]:
            rec["error"] = "stream ended without prompt token ids or generated tokens"
    except Exception as err:  # a benchmark records a failed request and goes on
        rec.update(error=f"{type(err).__name__}: {err}"[:500])
    return rec


async def _drive(url: str, bodies: list[dict], concurrency: int, image_token_id: int):
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(7200.0), limits=limits) as client:

        async def bounded(body):
            async with sem:
                return await _one(client, url, body, image_token_id)

        t0 = time.perf_counter()
        recs = await asyncio.gather(*(bounded(b) for b in bodies))
        return time.perf_counter() - t0, list(recs)


def run_cell(
    server: Server, bodies: list[dict], concurrency: int, image_token_id: int, others=(), settle_s: float = 0.0
) -> dict:
    """All ``bodies`` against ``server`` with at most ``concurrency`` in flight, after ``settle_s`` s of quiet;
    the cell's metrics."""
    time.sleep(settle_s)
    cpu0 = [s.cpu_seconds() for s in others]
    wall, recs = asyncio.run(_drive(server.url + "/v1/chat/completions", bodies, concurrency, image_token_id))
    background = sum(s.cpu_seconds() for s in others) - sum(cpu0)
    ok = [r for r in recs if r["ok"]]
    ttft = [r["ttft_s"] for r in ok]
    out_tokens = sum(r["completion_tokens"] for r in ok)
    return {
        "requests": len(recs),
        "ok": len(ok),
        "errors": [r.get("error") for r in recs if not r["ok"]][:5],
        "wall_s": wall,
        "requests_per_s": len(ok) / wall,
        "ttft_p50_s": _percentile(ttft, 50),
        "ttft_p95_s": _percentile(ttft, 95),
        "latency_p50_s": _percentile([r["latency_s"] for r in ok], 50),
        "output_tokens_per_s": out_tokens / wall,
        "prompt_tokens": [r.get("prompt_tokens") for r in recs],
        "visual_tokens": [r.get("visual_tokens") for r in recs],
        "background_cpu_s": background,
    }


class _Images:
    """Deterministic request images: every (round, level) gets its own, the same for every configuration."""

    def __init__(self, sizes, max_tokens: int) -> None:
        self.sizes, self.max_tokens, self._key, self._bodies = sizes, max_tokens, None, None

    def bodies(self, key: tuple, n: int) -> list[dict]:
        from ...testing import demo_image

        if key != self._key:
            rnd, c = key
            seed0 = (rnd * 10_000 + c) * 10_000
            hw = [self.sizes[i % len(self.sizes)] for i in range(n)]
            urls = [data_url(image_bytes(demo_image(height=h, width=w, seed=seed0 + i))) for i, (h, w) in enumerate(hw)]
            self._key = key
            self._bodies = [chat_body(SERVED_NAME, [u], TEXT, self.max_tokens) for u in urls]
        return self._bodies

    def warmup(self) -> list[dict]:
        from ...testing import demo_image

        urls = [
            data_url(image_bytes(demo_image(height=h, width=w, seed=10**9 + i))) for i, (h, w) in enumerate(self.sizes)
        ]
        return [chat_body(SERVED_NAME, [u], TEXT, 2) for u in urls]


def _warm(server: Server, images: _Images, image_token_id: int) -> None:
    cell = run_cell(server, images.warmup(), 1, image_token_id)
    if cell["ok"] != cell["requests"]:
        raise ServerError(f"{server.name}: warm-up requests failed: {cell['errors'][:2]}")


def _launch_mode(args, n_servers: int, ckpt: str) -> tuple[str, dict[str, float]]:
    import psutil

    weights = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt)) / 2**30
    per_server = weights + args.kv_cache_gib + 2.0  # + API server, engine core and worker overhead (measured ~2 GiB)
    avail = psutil.virtual_memory().available / 2**30
    est = {"per_server_gib": per_server, "available_gib": avail, "servers": n_servers}
    if args.launch != "auto":
        return args.launch, est
    return ("together" if n_servers * per_server < 0.8 * avail else "per-round"), est


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document."""
    fam = FAMILIES[args.family]
    sizes = fam.smoke_sizes if args.smoke else fam.sizes
    configs: list[tuple[str, dict | None]] = [("stock", None)] + [
        (f"{args.method} R={r:g}", {"method": args.method, "retention_ratio": r}) for r in args.ratios
    ]
    levels = args.concurrency
    n_req = {c: args.requests or max(8, 2 * c) for c in levels}
    tmp = tempfile.mkdtemp(prefix="serve-bench-")
    log_dir = args.log_dir or tmp
    os.makedirs(log_dir, exist_ok=True)
    servers: dict[str, Server] = {}
    try:
        t0 = time.perf_counter()
        ckpt = os.path.join(tmp, "model")
        hf_config = fam.build(ckpt, args.smoke, args.vision_layers, args.text_layers)
        template = os.path.join(tmp, "chat.jinja")
        with open(template, "w") as f:
            f.write(fam.chat_template)
        image_token_id = int(hf_config.image_token_id)
        settings = processor_settings(ckpt)
        max_len = max(fam.stock_tokens(hf_config, (h, w), settings) for h, w in sizes) + 64 + args.max_tokens
        build_s = time.perf_counter() - t0
        mode, mem = _launch_mode(args, len(configs), ckpt)
        env = {"VLLM_CPU_KVCACHE_SPACE": f"{args.kv_cache_gib:g}"}

        def make(name: str, options: dict | None) -> Server:
            overrides = None if options is None else {"architectures": [fam.architecture], "globalcom2": options}
            cmd = serve_command(
                ckpt, free_port(), served_name=SERVED_NAME, overrides=overrides, chat_template=template,
                max_model_len=max_len, python=args.python,
                extra=["--no-enable-prefix-caching", "--mm-processor-cache-gb", "0"],
            )  # fmt: skip
            slug = name.replace(" ", "_").replace("=", "")
            return Server(cmd, os.path.join(log_dir, f"{slug}.log"), env=env, name=name)

        images = _Images(sizes, args.max_tokens)
        cells: dict[tuple[str, int], list[dict]] = {(n, c): [] for n, _ in configs for c in levels}
        starts: dict[str, list[float]] = {n: [] for n, _ in configs}
        _log(f"{PROG}: {len(configs)} configurations x concurrency {levels} x {args.repeats} round(s), launch {mode}")
        if mode == "together":
            for name, options in configs:
                servers[name] = make(name, options).start()
            for name, s in servers.items():
                starts[name].append(s.wait_ready(args.start_timeout))
                _warm(s, images, image_token_id)
                _log(f"  {name}: up in {s.start_s:.0f} s, warmed ({s.url})")
            for rnd in range(args.repeats):
                for li, c in enumerate(levels):
                    k = (rnd * len(levels) + li) % len(configs)
                    for name, _ in configs[k:] + configs[:k]:
                        others = [s for n, s in servers.items() if n != name]
                        bodies = images.bodies((rnd, c), n_req[c])
                        cell = run_cell(servers[name], bodies, c, image_token_id, others, args.settle_s)
                        cell["round"] = rnd
                        cells[(name, c)].append(cell)
                        _log_cell(name, c, rnd, cell)
        else:
            for rnd in range(args.repeats):
                k = rnd % len(configs)
                for name, options in configs[k:] + configs[:k]:
                    s = servers[name] = make(name, options).start()
                    starts[name].append(s.wait_ready(args.start_timeout))
                    _warm(s, images, image_token_id)
                    _log(f"  round {rnd} {name}: up in {s.start_s:.0f} s, warmed ({s.url})")
                    for c in levels:
                        cell = run_cell(s, images.bodies((rnd, c), n_req[c]), c, image_token_id, (), args.settle_s)
                        cell["round"] = rnd
                        cells[(name, c)].append(cell)
                        _log_cell(name, c, rnd, cell)
                    s.stop()
                    del servers[name]
        lm = LMShape.from_config(hf_config)
        rows = summarise(configs, levels, cells, lm)
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # the checkpoint (and the logs unless --log-dir)
    import importlib.metadata as md

    try:
        vllm_version = md.version("vllm")
    except md.PackageNotFoundError:
        vllm_version = "unknown"
    if args.smoke:
        model = f"tiny random {args.family} (the test model), fp32"
    else:
        model = f"{fam.widths} widths, random weights, {args.vision_layers} vision + {args.text_layers} LM layers, fp32"
    return {
        "benchmark": "globalcom2 serve-bench: vllm serve, OpenAI chat completions, stock vs globalcom2 plugin",
        "schema": 1,
        "family": args.family,
        "model": model,
        "lm_shape": {k: getattr(lm, k) for k in ("num_layers", "hidden_size", "intermediate_size")},
        "method": args.method,
        "ratios": args.ratios,
        "concurrency": levels,
        "repeats": args.repeats,
        "requests_per_cell": {str(c): n_req[c] for c in levels},
        "max_tokens": args.max_tokens,
        "settle_s": args.settle_s,
        "image_sizes_hw": [list(s) for s in sizes],
        "launch": mode,
        "memory_estimate": mem,
        "kv_cache_gib": args.kv_cache_gib,
        "server_start_s": starts,
        "checkpoint_build_s": build_s,
        "smoke": bool(args.smoke),
        "vllm": vllm_version,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "rows": rows,
    }


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _log_cell(name: str, c: int, rnd: int, cell: dict) -> None:
    _log(
        f"  round {rnd} c={c:<3} {name:>20}: {cell['ok']}/{cell['requests']} ok, {cell['requests_per_s']:.3f} req/s, "
        f"TTFT p50 {cell['ttft_p50_s']:.3f} s, background CPU {cell['background_cpu_s']:.1f} s"
    )


def _mean(values: list) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def summarise(configs, levels, cells, lm: LMShape) -> list[dict[str, Any]]:
    """One row per (configuration, concurrency): spreads over rounds, token counts, Eq. 8 bound, ratios."""
    rows = []
    for c in levels:
        base = cells[("stock", c)]
        for name, options in configs:
            rounds = cells[(name, c)]
            visual = [v for cell in rounds for v in cell["visual_tokens"]]
            stock_visual = [v for cell in base for v in cell["visual_tokens"]]
            pairs = [(s, t) for s, t in zip(stock_visual, visual) if s is not None and t is not None]
            f_stock = sum(prefill_flops(lm, s) for s, _ in pairs)
            f_this = sum(prefill_flops(lm, t) for _, t in pairs)
            bound = f_stock / f_this if f_this else float("nan")
            rps_x = [r["requests_per_s"] / b["requests_per_s"] if b["requests_per_s"] else float("nan")
                     for r, b in zip(rounds, base)]  # fmt: skip
            ttft_x = [b["ttft_p50_s"] / r["ttft_p50_s"] if r["ttft_p50_s"] else float("nan")
                      for r, b in zip(rounds, base)]  # fmt: skip
            row = {
                "config": name,
                "options": options,
                "concurrency": c,
                "rounds": len(rounds),
                "requests": sum(r["requests"] for r in rounds),
                "ok": sum(r["ok"] for r in rounds),
                "prompt_tokens_mean": _mean([v for cell in rounds for v in cell["prompt_tokens"]]),
                "visual_tokens_mean": _mean(visual),
                "requests_per_s": spread([r["requests_per_s"] for r in rounds]),
                "ttft_p50_s": spread([r["ttft_p50_s"] for r in rounds]),
                "ttft_p95_s": spread([r["ttft_p95_s"] for r in rounds]),
                "latency_p50_s": spread([r["latency_p50_s"] for r in rounds]),
                "output_tokens_per_s": spread([r["output_tokens_per_s"] for r in rounds]),
                "background_cpu_s": spread([r["background_cpu_s"] for r in rounds]),
                "speedup_requests_per_s": spread(rps_x),
                "speedup_ttft_p50": spread(ttft_x),
                "eq8_prefill_flops_bound": bound,
            }
            row["requests_per_s_speedup_vs_bound"] = row["speedup_requests_per_s"]["median"] / bound
            row["ttft_speedup_vs_bound"] = row["speedup_ttft_p50"]["median"] / bound
            row["per_round"] = [{k: v for k, v in r.items()} for r in rounds]
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def _fmt(s: dict, digits: int = 3) -> str:
    m, lo, hi = s["median"], s["min"], s["max"]
    if math.isnan(m):
        return "n/a"
    if abs(hi - lo) <= 1e-12 * max(1.0, abs(m)):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def format_table(doc: dict[str, Any]) -> str:
    """The markdown table of a serve-bench document."""
    head = (
        "| config | c | prompt tok | visual tok | req/s | TTFT p50 s | TTFT p95 s | out tok/s "
        "| req/s x | TTFT x | Eq. 8 | req/s x / Eq. 8 | TTFT x / Eq. 8 |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in doc["rows"]:
        lines.append(
            f"| {r['config']} | {r['concurrency']} | {r['prompt_tokens_mean']:.0f} | {r['visual_tokens_mean']:.0f} "
            f"| {_fmt(r['requests_per_s'])} | {_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_p95_s'])} "
            f"| {_fmt(r['output_tokens_per_s'], 2)} | {_fmt(r['speedup_requests_per_s'], 2)} "
            f"| {_fmt(r['speedup_ttft_p50'], 2)} | {r['eq8_prefill_flops_bound']:.2f} "
            f"| {r['requests_per_s_speedup_vs_bound']:.2f} | {r['ttft_speedup_vs_bound']:.2f} |"
        )
    return head + "\n".join(lines)


def plot(doc: dict[str, Any], path: str) -> None:
    """req/s, TTFT p50, out tok/s and the req/s speed-up over stock (with Eq. 8's bound) vs concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("requests_per_s", "requests / s"),
        ("ttft_p50_s", "TTFT p50 (s)"),
        ("output_tokens_per_s", "output tokens / s"),
        ("speedup_requests_per_s", "req/s speed-up over stock (dashed: Eq. 8 bound)"),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    names = list(dict.fromkeys(r["config"] for r in doc["rows"]))
    for ax, (key, label) in zip(axes.flat, panels):
        for i, name in enumerate(names):
            rows = [r for r in doc["rows"] if r["config"] == name]
            xs = [r["concurrency"] for r in rows]
            med = [r[key]["median"] for r in rows]
            err = [[m - r[key]["min"] for m, r in zip(med, rows)], [r[key]["max"] - m for m, r in zip(med, rows)]]
            line = ax.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=name, color=f"C{i}")
            if key == "speedup_requests_per_s" and name != "stock":
                ax.plot(xs, [r["eq8_prefill_flops_bound"] for r in rows], ls="--", color=line[0].get_color())
        ax.set_xscale("log", base=2)
        ax.set_xticks(doc["concurrency"], [str(c) for c in doc["concurrency"]])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"{doc['model']}, vLLM {doc['vllm']}, {doc['machine']}: median and min-max over "
                 f"{doc['repeats']} round(s)", fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``globalcom2 serve-bench``."""
    args = parse_args(argv)
    if args.from_json:
        try:
            with open(args.from_json) as f:
                doc = json.load(f)
            table = format_table(doc)
        except (ValueError, KeyError, TypeError) as err:
            print(f"{PROG}: error: --from-json {args.from_json}: not a serve-bench document ({err!r})", file=sys.stderr)
            return 2
        print(table)
        if args.plot:
            plot(doc, args.plot)
        return 0
    try:
        doc = run(args)
    except ServerError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; servers stopped", file=sys.stderr)
        return 130
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=2)
    print(format_table(doc))
    if args.plot:
        plot(doc, args.plot)
    lost = sum(r["requests"] - r["ok"] for r in doc["rows"])
    if lost:
        print(f"{PROG}: {lost} request(s) failed (see per_round errors in the JSON)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
