"""``globalcom2 bench``: measured vision / compression / prefill / decode time, memory and KV cache.

Stock and compressed runs are interleaved in one process (warm-up first, medians over repeats),
so every ratio printed compares measurements taken side by side on the same machine. By default
the model has LLaVA-NeXT-7B's real widths with random weights (nothing is downloaded): a
CLIP-ViT-L/14-336 vision tower and a Vicuna-7B-shaped language model (d = 4096, m = 11008, 32
heads) cut to a few layers so it fits a 24 GiB CPU box. ``--model PATH`` loads a local checkpoint of
any supported family; ``--tiny --family F`` the tiny random model of family F (seconds; smoke tests).

Every stage runs through the family's adapter (``models.adapter_for``), so a new family needs no edit here.
Columns: ``vision`` the row's whole vision path (the adapter's ``stock_features`` for the stock row and
in-LLM methods, its ``compress`` for a vision-side method: tower, projector, scores, selection and
emission), ``select`` what the method adds to it (the row's vision time minus the stock row's: a
difference of two medians; in-LLM methods select inside ``prefill``), ``pack`` the splice into the prompt,
``prefill`` the language model over the prompt, ``decode`` one new token with the KV cache, ``peak`` the
extra memory during prefill (CUDA: allocator peak; CPU: resident-set peak sampled every 2 ms), ``kv`` the
cache bytes after prefill beside the analytic ``2 L T d_kv bytes``, and the Eq. 8 prefill-FLOPs bound on
the speedup.

``--options`` passes a method's other options as JSON, e.g. SparseVLM on a 4-layer model:
``--layers 4 --methods sparsevlm --options '{"sparsevlm": {"layers": [0, 1, 2]}}'``.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import flops

DEFAULT_METHODS = ("globalcom2", "fastervlm", "fastv")
DEFAULT_RATIOS = (0.75, 0.5, 0.25, 0.1)
QUESTION = "what is in this picture ? please describe it ."


@dataclass
class Row:
    """One measured configuration (medians over repeats)."""

    method: str
    ratio: float
    visual_tokens: int
    seq_len: int
    vision_ms: float
    select_ms: float | None
    pack_ms: float
    prefill_ms: float
    decode_ms: float
    peak_mb: float
    kv_mb: float
    kv_pred_mb: float
    prefill_speedup: float = 1.0
    eq8_speedup: float = 1.0
    prefill_extrapolated_ms: float | None = None


# --------------------------------------------------------------------------------------------
# model construction
# --------------------------------------------------------------------------------------------

#: the random model with LLaVA-NeXT-7B's vision tower and Vicuna-7B's widths (``testing.tiny_model`` keywords)
LLAVA_NEXT_7B_SHAPE = dict(
    image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16,
    text_hidden=4096, text_intermediate=11008, text_heads=32, text_init_std=0.02,
)  # fmt: skip


def bench_prompt(processor) -> str:
    """LLaVA's one-turn prompt around the processor's image token (random-weight processors have no template)."""
    from .common import image_prompt

    token = getattr(processor, "image_token", None) or "<image>"
    if getattr(processor, "chat_template", None):
        return image_prompt(processor, QUESTION)
    return f"USER: {token}\n{QUESTION} ASSISTANT:"


def build_model(args):
    """The model and the processor's inputs (plus ``processor_kwargs``) the benchmark runs on."""
    import torch

    from ..models import adapter_for
    from ..testing import DEMO_MODELS, demo_image, tiny_model, tiny_processor
    from .common import load_checkpoint

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    if args.model:
        model, processor = load_checkpoint(args.model, args.dtype, args.device)
        model.set_attn_implementation(args.attn)
    elif args.tiny:
        torch.manual_seed(0)
        model, processor = DEMO_MODELS[args.family]()
        model = model.to(dtype)
        model.set_attn_implementation(args.attn)
    else:
        shape = dict(LLAVA_NEXT_7B_SHAPE, text_layers=args.layers)
        processor = tiny_processor(image_size=336, patch_size=14)
        model = tiny_model(seed=0, attn_implementation=args.attn, dtype=dtype, **shape)
    model = model.to(args.device).eval()
    h, w = args.image_size
    image = demo_image(height=h, width=w)
    inputs = processor(images=[image], text=[bench_prompt(processor)], return_tensors="pt").to(args.device)
    inputs = dict(inputs, **adapter_for(model).processor_kwargs(processor, [image]))
    if inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return model, inputs


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


class _PeakRSS:
    """Peak resident memory above the level at entry (CPU), sampled in a thread."""

    def __init__(self, device: str):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096
        except OSError:  # pragma: no cover - non-Linux
            return 0

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self._stop = self._rss(), False
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop:
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop = True
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base)
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def kv_cache_bytes(cache) -> int:
    """Bytes held by a transformers cache object (keys + values of every layer)."""
    import torch

    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def measure(
    model, inputs, method: str | None, ratio: float, decode_tokens: int, device: str, options: dict | None = None
) -> dict:
    """One run: times of each stage, memory, KV-cache bytes and per-layer cached lengths.

    Every stage is the family adapter's (``stock_features`` or ``compress``, then ``pack``), so any supported
    family runs. options: the method's other options (e.g. ``{"layers": (0, 1, 2)}`` for SparseVLM on a short
    model).
    """
    import torch

    from .. import make_config
    from ..models import adapter_for, llm_pruning

    adapter = adapter_for(model)
    pv, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs.get("attention_mask")
    vision_kwargs = {k: inputs[k] for k in adapter.vision_kwargs if k in inputs}
    cfg = make_config(method, retention_ratio=ratio, **(options or {})) if method else None
    cfg = adapter.resolve(cfg, model.config) if cfg is not None else None
    # stock runs the stock vision path: what prepare_images gives any in-LLM method (they prune inside prefill)
    vision_cfg = cfg if cfg is not None else make_config("fastv", retention_ratio=1.0)
    with torch.no_grad():
        batch, t_vis = _timed(lambda: adapter.prepare_images(model, vision_cfg, pv, vision_kwargs, ids, mask), device)
        packed, t_pack = _timed(
            lambda: adapter.pack(model, ids, mask, batch.features, batch.stock_counts, batch=batch), device
        )
    lm = adapter.language_model(model)
    in_llm = cfg is not None and cfg.where == "llm"
    ctx = llm_pruning.pruning(model, cfg, packed.image_spans, lm) if in_llm else None

    def prefill():
        out = lm(inputs_embeds=packed.inputs_embeds, attention_mask=packed.attention_mask,
                 position_ids=packed.position_ids, use_cache=True)  # fmt: skip
        return out, model.lm_head(out.last_hidden_state[:, -1:])

    layer_times: list[float] = []
    timers = _layer_timers(lm, layer_times, device)
    with torch.no_grad(), _PeakRSS(device) as peak:
        if ctx is not None:
            with ctx:
                (out, logits), t_pre = _timed(prefill, device)
                decode_ms = _decode(model, lm, out, logits, packed, decode_tokens, device)
                layer_lens = _cache_lengths(_cache_of(out))
        else:
            (out, logits), t_pre = _timed(prefill, device)
            layer_lens = _cache_lengths(_cache_of(out))
            decode_ms = None
    layer_times = layer_times[: len(lm.layers)]  # prefill only
    for h in timers:
        h.remove()
    if ctx is None:
        with torch.no_grad():
            decode_ms = _decode(model, lm, out, logits, packed, decode_tokens, device)
    kv = kv_cache_bytes(_cache_of(out))
    return dict(
        vision=t_vis, pack=t_pack, prefill=t_pre, decode=decode_ms, peak=peak.peak, kv=kv,
        visual_tokens=sum(int(f.shape[0]) for f in batch.features), seq_len=packed.inputs_embeds.shape[1],
        layer_lens=layer_lens, layer_times=layer_times, where="stock" if cfg is None else cfg.where,
    )  # fmt: skip


def _layer_timers(lm, times: list[float], device: str) -> list:
    """Hooks appending each decoder layer's wall time (prefill and decode alike) to ``times``."""
    start = {}

    def pre(mod, args, kwargs):
        _sync(device)
        start[mod] = time.perf_counter()

    def post(mod, args, kwargs, out):
        _sync(device)
        times.append(time.perf_counter() - start.pop(mod))

    handles = []
    for layer in lm.layers:
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    return handles


def extrapolate_prefill(cfg, layer_lens: list[int], layer_times: list[float], depth: int) -> float | None:
    """Prefill time of the same model at ``depth`` layers, from the measured per-layer times.

    Every layer of the deeper model is given the median time of the measured layers that
    processed the same stage of the method (full sequence before the first in-LLM pruning layer,
    then each pruned stage); None when the short model did not reach a stage the deep one has.
    """
    cuts = sorted(cfg.prune_layers(depth)) if cfg is not None and cfg.where == "llm" else []
    measured_cuts = sorted(cfg.prune_layers(len(layer_lens))) if cuts else []
    stage_of = lambda i, cs: sum(1 for c in cs if c <= i)
    by_stage: dict[int, list[float]] = {}
    for i, t in enumerate(layer_times):
        by_stage.setdefault(stage_of(i, measured_cuts), []).append(t)
    total = 0.0
    for i in range(depth):
        times = by_stage.get(stage_of(i, cuts))
        if not times:
            return None
        total += statistics.median(times)
    return total


def _cache_of(out):
    """The KV cache of a model output (``cache`` in recent transformers, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _cache_kwarg(lm) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _cache_lengths(cache) -> list[int]:
    return [int(layer.keys.shape[-2]) for layer in cache.layers]


def _decode(model, lm, out, logits, packed, n: int, device: str) -> float:
    """Median time of one decoding step over ``n`` greedy tokens (the cache grows as it goes)."""
    import torch

    if n <= 0:
        return float("nan")
    cache, mask, kw = _cache_of(out), packed.attention_mask, _cache_kwarg(lm)
    token = logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for _ in range(n):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        emb = model.get_input_embeddings()(token)
        step, t = _timed(lambda emb=emb, mask=mask: lm(inputs_embeds=emb, attention_mask=mask, **{kw: cache}), device)
        times.append(t)
        token = model.lm_head(step.last_hidden_state[:, -1:]).argmax(-1)
    # drop the trimmed cache growth from the measured KV: restore prompt-only cache length
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., :-n, :], layer.values[..., :-n, :]
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def run(args) -> list[Row]:
    """Measure stock and every (method, ratio), interleaved, and return the rows."""
    from .. import make_config
    from ..models import adapter_for

    model, inputs = build_model(args)
    adapter = adapter_for(model)
    shape = flops.LMShape.from_config(model.config)
    element = next(adapter.language_model(model).parameters()).element_size()
    configs = [(None, 1.0)] + [(m, r) for m in args.methods for r in args.ratios]
    for m in args.methods:  # validate names, options and the model before the long run
        cfg = make_config(m, retention_ratio=args.ratios[0], **_options(args, m))
        adapter.resolve(cfg, model.config)
        cfg.check_model(model)
    samples: dict[tuple, list[dict]] = {c: [] for c in configs}
    for c in configs:  # warm-up: one untimed pass over every configuration
        measure(model, inputs, c[0], c[1], 1, args.device, _options(args, c[0]))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - optional
        tqdm = None
    total = args.repeats * len(configs)
    bar = tqdm(total=total, desc="bench", disable=args.quiet) if tqdm else None
    for _ in range(args.repeats):
        for c in configs:  # stock and compressed interleaved in every repeat
            samples[c].append(measure(model, inputs, c[0], c[1], args.decode_tokens, args.device, _options(args, c[0])))
            if bar:
                bar.update(1)
    if bar:
        bar.close()

    rows = []
    med = lambda c, key: statistics.median(s[key] for s in samples[c])
    stock = configs[0]
    n_text = int(samples[stock][0]["seq_len"] - samples[stock][0]["visual_tokens"])
    t_stock_visual = samples[stock][0]["visual_tokens"]
    f_stock = flops.prefill_flops(shape, t_stock_visual)
    for c in configs:
        s0 = samples[c][0]
        lens = s0["layer_lens"]
        kv_pred = sum(flops.kv_cache_bytes(_one_layer(shape), t, element) for t in lens)
        if s0["where"] == "llm":  # in-LLM: visual tokens differ per layer; Eq. 8 summed layer by layer
            per_layer_visual = [t - n_text for t in lens]
            f = sum(flops.prefill_flops(_one_layer(shape), v) for v in per_layer_visual)
            f_ref = sum(flops.prefill_flops(_one_layer(shape), t_stock_visual) for _ in lens)
            eq8 = f_ref / f
            visual = round(sum(per_layer_visual) / len(per_layer_visual))
        else:
            visual = s0["visual_tokens"]
            eq8 = f_stock / flops.prefill_flops(shape, visual)
        row = Row(
            method=c[0] or "stock",
            ratio=c[1],
            visual_tokens=visual,
            seq_len=int(s0["seq_len"]),
            vision_ms=med(c, "vision") * 1e3,
            select_ms=(med(c, "vision") - med(stock, "vision")) * 1e3 if s0["where"] == "vision" else None,
            pack_ms=med(c, "pack") * 1e3,
            prefill_ms=med(c, "prefill") * 1e3,
            decode_ms=med(c, "decode") * 1e3,
            peak_mb=med(c, "peak") / 2**20,
            kv_mb=s0["kv"] / 2**20,
            kv_pred_mb=kv_pred / 2**20,
            eq8_speedup=eq8,
        )
        if args.extrapolate_layers:
            cfg = make_config(c[0], retention_ratio=c[1], **_options(args, c[0])) if c[0] else None
            per_layer = [statistics.median(s["layer_times"][i] for s in samples[c]) for i in range(len(lens))]
            t = extrapolate_prefill(cfg, lens, per_layer, args.extrapolate_layers)
            row.prefill_extrapolated_ms = None if t is None else t * 1e3
        rows.append(row)
    for row in rows:
        row.prefill_speedup = rows[0].prefill_ms / row.prefill_ms
    return rows


def _options(args, method: str | None) -> dict:
    """The ``--options`` given for ``method`` (JSON lists become tuples)."""
    raw = (getattr(args, "options", None) or {}).get(method, {}) if method else {}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


def _one_layer(shape):
    """The same shape with a single layer (per-layer FLOPs / KV bytes)."""
    from dataclasses import replace

    return replace(shape, num_layers=1)


def format_table(rows: list[Row], args) -> str:
    """The printed results table."""
    head = (
        f"{'method':>12} {'R':>5} {'vis.tok':>7} {'vision ms':>9} {'select ms':>9} {'prefill ms':>10} "
        f"{'speedup':>7} {'Eq.8 bound':>10} {'decode ms':>9} {'peak MB':>8} {'KV MiB':>8} {'KV pred':>8}"
    )
    if args.extrapolate_layers:
        head += f" {'prefill@' + str(args.extrapolate_layers) + 'L (extrap.)':>22}"
    lines = [head]
    for r in rows:
        line = (
            f"{r.method:>12} {r.ratio:>5.2f} {r.visual_tokens:>7d} {r.vision_ms:>9.1f} "
            f"{'-' if r.select_ms is None else f'{r.select_ms:+.1f}':>9} "
            f"{r.prefill_ms:>10.1f} {r.prefill_speedup:>6.2f}x {r.eq8_speedup:>9.2f}x {r.decode_ms:>9.2f} "
            f"{r.peak_mb:>8.1f} {r.kv_mb:>8.2f} {r.kv_pred_mb:>8.2f}"
        )
        if args.extrapolate_layers:
            x = r.prefill_extrapolated_ms
            line += f" {'n/a' if x is None else f'{x:.1f}':>22}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    """Speedup vs R per method, measured beside the Eq. 8 bound (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - optional extra
        raise ImportError("--plot needs matplotlib: pip install globalcom2[viz]") from err
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r.method for r in rows if r.method != "stock"):
        rs = sorted((r for r in rows if r.method == method), key=lambda r: r.ratio)
        line = ax.plot([r.ratio for r in rs], [r.prefill_speedup for r in rs], "o-", label=f"{method} measured")
        ax.plot([r.ratio for r in rs], [r.eq8_speedup for r in rs], "--", color=line[0].get_color(), alpha=0.6,
                label=f"{method} Eq. 8 bound")  # fmt: skip
    ax.set_xlabel("retention ratio R")
    ax.set_ylabel("LLM prefill speedup vs stock")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``globalcom2 bench``."""
    from .common import (
        Parser,
        checkpoint_dir,
        known_family,
        method_config,
        resolve_device,
        resolve_dtype,
        summary,
        writable,
    )

    ap = Parser(prog="globalcom2 bench", description=summary(__doc__))
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", help="local checkpoint of any supported family (default: random weights, real widths)")
    src.add_argument("--tiny", action="store_true", help="the tiny random model of --family (seconds; smoke tests)")
    ap.add_argument("--family", default="llava_next",
                    help="family of the --tiny model: llava_next (default), llava_onevision, internvl, ... "
                    "(a --model checkpoint names its own)")  # fmt: skip
    ap.add_argument("--layers", type=int, default=3, help="LM layers of the random 7B-shaped model (FastV K=2 needs 3)")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS))
    ap.add_argument("--image-size", nargs=2, type=int, default=[672, 672], metavar=("H", "W"),
                    help="height and width of the generated test image in pixels (default 672 672)")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=4)
    ap.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="default: float16 on CUDA, float32 elsewhere")  # fmt: skip
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--extrapolate-layers", type=int, default=None,
                    help="also print prefill time scaled to this many layers (labelled as extrapolated)")  # fmt: skip
    ap.add_argument("--options", default="{}",
                    help='JSON options per method, e.g. {"sparsevlm": {"layers": [0, 1, 2]}} (4 layers)')  # fmt: skip
    ap.add_argument("--json", help="write rows as JSON")
    ap.add_argument("--csv", help="write rows as CSV")
    ap.add_argument("--plot", help="write a speedup-vs-R PNG (matplotlib)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    known_family(ap, args.family)
    if args.repeats < 1:
        ap.fail("--repeats", args.repeats, "must be >= 1")
    if args.layers < 1:
        ap.fail("--layers", args.layers, "must be >= 1")
    if args.decode_tokens < 0:
        ap.fail("--decode-tokens", args.decode_tokens, "must be >= 0")
    if min(args.image_size) < 1:
        ap.fail("--image-size", args.image_size, "height and width must be positive pixel counts")
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as err:
        ap.fail("--options", args.options, f"not JSON ({err})")
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        ap.fail("--options", args.options, "must be a JSON object of method name -> object of options")
    args.options = options
    for m in args.methods:
        for r in args.ratios:
            method_config(ap, m, r, _options(args, m), ("--methods", "--ratios", "--options"))
    unused = sorted(set(options) - set(args.methods))
    if unused:
        ap.fail("--options", args.options, f"names {', '.join(unused)}, which is not among --methods")
    checkpoint_dir(ap, "--model", args.model)
    for flag in ("--json", "--csv", "--plot"):
        writable(ap, flag, getattr(args, flag[2:]))
    args.device = resolve_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)

    try:
        rows = run(args)
    except ValueError as err:  # a method the family cannot run, an option the model refuses
        ap.error(str(err))
    what = "local checkpoint " + args.model if args.model else (
        f"tiny random {args.family} model" if args.tiny else
        f"random weights, LLaVA-NeXT-7B widths (CLIP-ViT-L/14-336 + Vicuna-7B d=4096 m=11008), {args.layers} LM layers"
    )  # fmt: skip
    h, w = args.image_size
    print(f"globalcom2 bench: {what}; image {h}x{w} px (height x width); device {args.device}; "
          f"{args.dtype}; attn {args.attn}; median of {args.repeats}, stock and methods interleaved")  # fmt: skip
    print(format_table(rows, args))
    print("speedup = stock prefill / method prefill (measured); Eq. 8 bound = stock / method prefill FLOPs "
          "over the visual tokens; KV pred = 2 L T d_kv bytes for the tokens each layer cached; "
          "select = the row's vision time minus the stock row's (what scores and selection add).")  # fmt: skip
    if args.extrapolate_layers:
        print(
            f"prefill@{args.extrapolate_layers}L is EXTRAPOLATED, not measured: the median measured time of each "
            f"decoder layer, per pruning stage, summed over {args.extrapolate_layers} layers (no embedding/head)."
        )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2))
    if args.csv:
        flops.write_csv(args.csv, rows)
    if args.plot:
        plot(rows, args.plot)
        print(f"plot: {args.plot}")
    return 0
