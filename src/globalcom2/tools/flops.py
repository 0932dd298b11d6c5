"""``globalcom2 flops``: the paper's analytic cost model (Eq. 8, Tables VI-VII) and token counts.

Prefill FLOPs of the language model for T visual tokens (the paper leaves text tokens out)::

    FLOPs(T) = L * (8 T d^2 + 4 T^2 d + 6 T d m)

with L layers, hidden width d and MLP width m read from a Hugging Face config. (Eq. 8's
reduced form prints ``4RTd`` and ``4Td`` where dividing by ``T d`` gives ``4RT`` and ``4T``;
``flops_reduction`` uses the unreduced ratio, which is unambiguous.) KV-cache bytes
are ``2 * L * T * d_kv * bytes_per_element`` with ``d_kv = num_key_value_heads * head_dim``
(grouped-query attention shrinks it; Vicuna has none).

With Vicuna-7B's shape (L=32, d=4096, m=11008) this reproduces Table VI's TFLOPs exactly:
41.7, 30.4, 19.7, 9.6, 3.8 for T = 2880 * (1, .75, .5, .25, .1). With Vicuna-13B's shape (L=40,
d=5120, m=13824) Eq. 8 gives 79.9, 58.6, 38.2, 18.7, 7.4 where Table VII prints 80.0, 58.7,
38.3, 18.7, 7.4: three entries are 0.1 higher, a consistent +0.15 % that no real 13B shape
explains (it would need m ~= 13856); we print Eq. 8 on the real shape beside the paper's column.
The paper's KV-cache column is reproduced exactly from our byte counts by ``llm_viewer_mb``.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

PAPER_RATIOS = (1.0, 0.75, 0.5, 0.25, 0.1)
FULL_TOKENS = 2880  # 5 views x 576, "Upper Bound, 2880 Tokens"

KV_CACHE_NOTE = (
    "KV cache = 2 x L x T x d_kv x 2 bytes (fp16). The paper's KV-cache column (LLM-Viewer estimates) "
    "mixes units: sizes of 1 GB or more were printed in decimal GB to one decimal and turned into MB "
    "with x1024 (7B, 2880 tokens: 1.51e9 B -> 1.5 GB -> 1536.0), smaller ones in whole decimal MB "
    "(1440 tokens: 754.97e6 B -> 755.0). `llm_viewer_mb` applies that rule and reproduces all ten "
    "printed values from our exact byte counts; the exact sizes in MiB are in the KV MiB column, and "
    "`globalcom2 bench` measures the same bytes on a real cache."
)


def llm_viewer_mb(num_bytes: float) -> float:
    """The paper's KV-cache MB for ``num_bytes``: >= 1 GB as round(GB, 1) x 1024, else whole MB."""
    if num_bytes >= 1e9:
        return round(num_bytes / 1e9, 1) * 1024
    return float(round(num_bytes / 1e6))


@dataclass(frozen=True)
class LMShape:
    """Shape of a decoder-only language model, as the cost model needs it."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    name: str = ""

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config(cls, config, name: str = "") -> LMShape:
        """Shape from a transformers config (a multimodal config uses its ``text_config``), a dict, or a path."""
        if isinstance(config, (str, Path)):
            config = _load_config(Path(config))
        if isinstance(config, dict):
            config = config.get("text_config", config)
            get = config.get
        else:
            config = getattr(config, "text_config", None) or config
            get = lambda k, default=None: getattr(config, k, default)
        heads = get("num_attention_heads")
        try:
            return cls(
                num_layers=int(get("num_hidden_layers")),
                hidden_size=int(get("hidden_size")),
                intermediate_size=int(get("intermediate_size")),
                num_attention_heads=int(heads),
                num_key_value_heads=int(get("num_key_value_heads") or heads),
                name=name or str(get("_name_or_path", "") or get("model_type", "") or ""),
            )
        except TypeError as err:
            raise ValueError(
                "config must give num_hidden_layers, hidden_size, intermediate_size and num_attention_heads "
                f"(a language-model or LLaVA-NeXT config): {err}"
            ) from err


def _load_config(path: Path) -> dict:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"config must be a config.json or a directory holding one; {str(path)!r} has none")
    return json.loads(file.read_text())


PRESETS: dict[str, LMShape] = {
    "llava-next-7b": LMShape(32, 4096, 11008, 32, 32, "LLaVA-NeXT-7B (Vicuna-7B)"),
    "llava-next-13b": LMShape(40, 5120, 13824, 40, 40, "LLaVA-NeXT-13B (Vicuna-13B)"),
    # not in the paper's tables; shapes from the llava-hf checkpoints' text_config (GQA: 8 KV heads)
    "llava-next-mistral-7b": LMShape(32, 4096, 14336, 32, 8, "LLaVA-NeXT-Mistral-7B (Mistral-7B-Instruct-v0.2)"),
    "llava-next-34b": LMShape(60, 7168, 20480, 56, 8, "LLaVA-NeXT-34B (Nous-Hermes-2-Yi-34B)"),
}
#: the paper's printed columns (Tables VI and VII) for the presets: R -> (TFLOPs, KV-cache MB)
PAPER = {
    "llava-next-7b": {
        1.0: (41.7, 1536.0), 0.75: (30.4, 1126.4), 0.5: (19.7, 755.0), 0.25: (9.6, 377.0), 0.1: (3.8, 151.0),
    },
    "llava-next-13b": {
        1.0: (80.0, 2457.6), 0.75: (58.7, 1843.2), 0.5: (38.3, 1228.8), 0.25: (18.7, 590.0), 0.1: (7.4, 236.0),
    },
}  # fmt: skip


def _check_tokens(tokens) -> int:
    if isinstance(tokens, bool) or not isinstance(tokens, (int, float)) or tokens < 0 or tokens != int(tokens):
        raise ValueError(f"tokens must be a whole number >= 0, got {tokens!r}")
    return int(tokens)


def _check_ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a finite number in (0, 1], got {ratio!r}")
    return float(ratio)


def prefill_flops(shape: LMShape, tokens: int) -> float:
    """Eq. 8 prefill FLOPs of the language model for ``tokens`` visual tokens."""
    t, d, m = _check_tokens(tokens), shape.hidden_size, shape.intermediate_size
    return float(shape.num_layers * (8 * t * d * d + 4 * t * t * d + 6 * t * d * m))


def kv_cache_bytes(shape: LMShape, tokens: int, bytes_per_element: int = 2) -> int:
    """Bytes of the KV cache holding ``tokens`` tokens in every layer (GQA-aware)."""
    if bytes_per_element <= 0:
        raise ValueError(f"bytes_per_element must be > 0, got {bytes_per_element!r}")
    d_kv = shape.num_key_value_heads * shape.head_dim
    return 2 * shape.num_layers * _check_tokens(tokens) * d_kv * bytes_per_element


def flops_reduction(shape: LMShape, tokens: int, ratio: float) -> float:
    """Eq. 8's eta: share of prefill FLOPs saved by keeping ``int(tokens * ratio)`` tokens."""
    kept = int(_check_tokens(tokens) * _check_ratio(ratio))
    full = prefill_flops(shape, tokens)
    return 1.0 - prefill_flops(shape, kept) / full if full else 0.0


@dataclass
class EfficiencyRow:
    """One line of the efficiency table."""

    ratio: float
    tokens: int
    tflops: float
    reduction: float
    kv_cache_mb: float
    kv_cache_paper_rule_mb: float
    paper_tflops: float | None = None
    paper_kv_cache_mb: float | None = None


def efficiency_table(
    shape: LMShape, ratios=PAPER_RATIOS, tokens: int = FULL_TOKENS, bytes_per_element: int = 2, preset: str = ""
) -> list[EfficiencyRow]:
    """Tables VI/VII: TFLOPs, reduction and KV cache (MiB) at each retention ratio."""
    tokens = _check_tokens(tokens)
    if tokens == 0:
        raise ValueError("tokens must be > 0 for a table")
    rows = []
    full = prefill_flops(shape, tokens)
    for r in ratios:
        kept = int(tokens * _check_ratio(r))
        f = prefill_flops(shape, kept)
        paper = PAPER.get(preset, {}).get(float(r), (None, None))
        rows.append(
            EfficiencyRow(
                ratio=float(r),
                tokens=kept,
                tflops=f / 1e12,
                reduction=1 - f / full,
                kv_cache_mb=kv_cache_bytes(shape, kept, bytes_per_element) / 2**20,
                kv_cache_paper_rule_mb=llm_viewer_mb(kv_cache_bytes(shape, kept, bytes_per_element)),
                paper_tflops=paper[0],
                paper_kv_cache_mb=paper[1],
            )
        )
    return rows


# --------------------------------------------------------------------------------------------
# visual tokens per method
# --------------------------------------------------------------------------------------------

LLAVA_NEXT_7B_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclass
class TokenCount:
    """Visual tokens the language model receives for one image."""

    method: str
    ratio: float
    stock: int
    kept: int
    exact: bool  # False: the count depends on the image's content (GlobalCom²'s crop ratios)


def llava_next_config(geometry=None):
    """A ``LlavaNextConfig`` with LLaVA-NeXT-7B's vision geometry (336 px views, 14 px patches, its pinpoints), or
    ``geometry``'s (a ``models.llava_next.Geometry``); built in code, nothing is read or downloaded."""
    from transformers import CLIPVisionConfig, LlavaNextConfig

    if geometry is None:
        image_size, patch_size, pins = 336, 14, LLAVA_NEXT_7B_PINPOINTS
    else:
        image_size, patch_size, pins = geometry.image_size, geometry.patch_size, geometry.pinpoints
    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size)
    return LlavaNextConfig(vision_config=vision, image_grid_pinpoints=[list(p) for p in pins])


def visual_tokens(method: str, ratio: float, image_size=(672, 672), geometry=None, num_layers: int = 32) -> TokenCount:
    """Visual tokens kept by ``method`` at ``ratio`` for an image of (height, width), on LLaVA-NeXT-7B's geometry
    (or ``geometry``'s), asked of the method itself (``num_image_tokens``), never re-derived here.

    A vision-side method whose count depends on the image's content (GlobalCom²'s default budget, CDPruner's)
    reports its ``budget="exact"`` count with ``exact=False``: the content-dependent count is within a few tokens
    of it. An in-LLM method reports the visual tokens from its first pruning layer on (``stage_tokens`` on a
    ``num_layers``-layer LLM; ``layer_visual_tokens`` gives every layer's).
    """
    from ..budget import num_image_tokens, stock_image_tokens
    from ..methods import make_config

    ratio = _check_ratio(ratio)
    cfg = make_config(method, retention_ratio=ratio)
    config = llava_next_config(geometry)
    size = (int(image_size[0]), int(image_size[1]))
    stock = stock_image_tokens(config, size)
    if cfg.where == "llm":
        return TokenCount(method, ratio, stock, int(cfg.stage_tokens(stock, num_layers)[0]), True)
    try:
        return TokenCount(method, ratio, stock, num_image_tokens(config, size, cfg), True)
    except ValueError:
        return TokenCount(method, ratio, stock, num_image_tokens(config, size, make_config(cfg, budget="exact")), False)


def layer_visual_tokens(method: str, ratio: float, tokens: int, num_layers: int, **options) -> list[int]:
    """Visual tokens each decoder layer processes when ``tokens`` enter the language model.

    A vision-side method shortens the input, so every layer sees ``tokens`` (its kept count). An in-LLM
    method (fastv, sparsevlm, dart's default form) sees all ``tokens`` up to its first pruning layer,
    then each stage's count (``stage_tokens``): FastV int(T R) from layer K; DART 4 + 8 TOPK from layer K.
    """
    from ..methods import make_config

    cfg = make_config(method, retention_ratio=_check_ratio(ratio), **options)
    tokens = _check_tokens(tokens)
    if cfg.where != "llm":
        return [tokens] * num_layers
    cuts = sorted(cfg.prune_layers(num_layers))
    stages = (tokens, *cfg.stage_tokens(tokens, num_layers))
    return [stages[sum(1 for c in cuts if c <= i)] for i in range(num_layers)]


def method_prefill_flops(shape: LMShape, method: str, ratio: float, tokens: int, **options) -> float:
    """Eq. 8 prefill FLOPs summed layer by layer over what each layer sees (in-LLM methods prune mid-way).

    tokens: visual tokens entering the language model (the method's kept count for a vision-side method,
    the stock count for an in-LLM one).
    """
    one = replace(shape, num_layers=1)
    per_layer = layer_visual_tokens(method, ratio, tokens, shape.num_layers, **options)
    return float(sum(prefill_flops(one, t) for t in per_layer))


def _model_config(path: str):
    """The transformers config of ``path`` when it is a supported multimodal model's config.json, else None."""
    from transformers import AutoConfig

    from ..models import adapter_for

    data = dict(_load_config(Path(path)))
    try:
        config = AutoConfig.for_model(data.pop("model_type", None), **data)
        adapter_for(config, "config")
    except (ValueError, KeyError, TypeError):
        return None
    return config


def processor_settings(path) -> dict | None:
    """The image processor's settings saved beside a checkpoint's config, or None: ``preprocessor_config.json``
    (the hub checkpoints' file), else the ``image_processor`` entry of ``processor_config.json`` (what
    transformers 5 writes); what ``num_image_tokens(..., processor=)`` reads for families whose processor sets
    the geometry (Qwen-VL)."""
    import json

    f = Path(path) / "preprocessor_config.json"
    if f.is_file():
        return json.loads(f.read_text())
    f = Path(path) / "processor_config.json"
    if f.is_file():
        settings = json.loads(f.read_text()).get("image_processor")
        return settings if isinstance(settings, dict) else None
    return None


def family_token_counts(config, methods, ratios, image_size, processor=None) -> list[tuple[str, float, str]]:
    """(method, ratio, "stock S -> K") for a supported model config, from its adapter (``num_image_tokens``).

    Where the count depends on the image's content, ``budget="exact"`` is used and said so; methods that
    prune inside the language model or cannot run on the family say why. processor: as ``num_image_tokens``'s.
    """
    from functools import partial

    from ..budget import num_image_tokens

    num_image_tokens = partial(num_image_tokens, processor=processor)
    stock = num_image_tokens(config, image_size, "uniform", retention_ratio=1.0, layout="spatial")
    rows = []
    for m in methods:
        for r in ratios:
            try:
                line = f"stock {stock} -> {num_image_tokens(config, image_size, m, retention_ratio=r)}"
            except ValueError as err:
                if "budget='exact'" not in str(err):
                    rows.append((m, r, f"stock {stock}: {err}"))
                    continue
                line = f"stock {stock} -> {num_image_tokens(config, image_size, m, retention_ratio=r, budget='exact')}"
                line += " (budget='exact')"
            except TypeError as err:  # an option the method does not take
                line = f"stock {stock}: {err}"
            rows.append((m, r, line))
    return rows


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def write_csv(path: str, rows: list) -> None:
    """Write dataclass rows to a CSV file, one column per field."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        w.writerows(asdict(r) for r in rows)


def format_table(rows: list[EfficiencyRow], shape: LMShape) -> str:
    """The printed table."""
    lines = [
        f"{shape.name or 'model'}: L={shape.num_layers}, d={shape.hidden_size}, m={shape.intermediate_size}, "
        f"heads={shape.num_attention_heads}, kv heads={shape.num_key_value_heads}",
        f"{'R':>6} {'tokens':>7} {'TFLOPs':>8} {'(paper)':>8} {'reduction':>9} {'KV MiB':>9} "
        f"{'KV MB*':>8} {'(paper MB)':>10}",
    ]
    for r in rows:
        pt = "" if r.paper_tflops is None else f"{r.paper_tflops:.1f}"
        pk = "" if r.paper_kv_cache_mb is None else f"{r.paper_kv_cache_mb:.1f}"
        lines.append(
            f"{r.ratio:>6.0%} {r.tokens:>7d} {r.tflops:>8.1f} {pt:>8} {r.reduction:>8.0%} "
            f"{r.kv_cache_mb:>9.1f} {r.kv_cache_paper_rule_mb:>8.1f} {pk:>10}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``globalcom2 flops``."""
    from .common import Parser, method_config, summary, writable

    ap = Parser(prog="globalcom2 flops", description=summary(__doc__))
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="built-in shape (default llava-next-7b)")
    src.add_argument(
        "--config", help="a local config.json (or its directory) of a supported multimodal model or a language model"
    )
    ap.add_argument("--ratios", nargs="+", type=float, default=list(PAPER_RATIOS))
    ap.add_argument("--tokens", type=int, default=FULL_TOKENS, help="visual tokens at R = 1 (paper: 2880)")
    ap.add_argument("--bytes-per-element", type=int, default=2, help="KV-cache element size (2 = fp16)")
    ap.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"),
                    help="also print the visual tokens each method keeps for an image of this height and width "
                    "(pixels)")  # fmt: skip
    ap.add_argument("--methods", nargs="+", default=["globalcom2", "fastervlm", "fastv"])
    ap.add_argument("--csv", help="write the table as CSV")
    ap.add_argument("--json", help="write the table as JSON")
    args = ap.parse_args(argv)
    for r in args.ratios:
        try:
            _check_ratio(r)
        except ValueError as err:
            ap.fail("--ratios", r, err)
    if args.image_size is not None:
        if min(args.image_size) < 1:
            ap.fail("--image-size", args.image_size, "height and width must be positive pixel counts")
        for m in args.methods:
            for r in args.ratios:
                method_config(ap, m, r, flags=("--methods", "--ratios", "--options"))
    for flag in ("--csv", "--json"):
        writable(ap, flag, getattr(args, flag[2:]))
    try:
        if args.config:
            shape, preset = LMShape.from_config(args.config, name=args.config), ""
        else:
            preset = args.preset or "llava-next-7b"
            shape = PRESETS[preset]
    except ValueError as err:
        ap.fail("--config", args.config, err)
    try:
        rows = efficiency_table(shape, args.ratios, args.tokens, args.bytes_per_element, preset)
    except ValueError as err:
        ap.fail("--tokens", args.tokens, err)
    print(format_table(rows, shape))
    print(
        "TFLOPs: Eq. 8 prefill FLOPs of the LLM over the visual tokens / 1e12. KV MiB: 2 L T d_kv bytes / 2^20. "
        "KV MB*: the same bytes in the paper's units (see below)."
    )
    if preset:
        print("(paper): Table VI/VII as printed. " + KV_CACHE_NOTE)
        if preset == "llava-next-13b":
            print(
                "Table VII's TFLOPs for 100/75/50 % (80.0, 58.7, 38.3) are 0.1 above Eq. 8 on Vicuna-13B's "
                "shape (79.9, 58.6, 38.2): a uniform +0.15 % no real shape gives (it would need m ~= 13856)."
            )
    model_config = _model_config(args.config) if args.config and args.image_size else None
    if model_config is not None:
        size = tuple(args.image_size)
        print(f"\nvisual tokens for an image of {size[0]}x{size[1]} px, height x width ({model_config.model_type} "
              "geometry):")  # fmt: skip
        processor = processor_settings(args.config)
        for m, r, line in family_token_counts(model_config, args.methods, args.ratios, size, processor):
            print(f"  {m:>12} R={r:<5} {line}")
    elif args.image_size:
        from ..methods import REGISTRY

        size = tuple(args.image_size)
        print(f"\nvisual tokens for an image of {size[0]}x{size[1]} px, height x width (LLaVA-NeXT-7B geometry):")
        for m in args.methods:
            for r in args.ratios:
                c = visual_tokens(m, r, size)
                note = "" if c.exact else " (expected; depends on the image)"
                in_llm = REGISTRY[m].where == "llm"  # the method's default form
                entering = c.stock if in_llm else c.kept  # in-LLM: pruned layer by layer
                tf = method_prefill_flops(shape, m, r, entering) / 1e12
                print(f"  {m:>12} R={r:<5} stock {c.stock} -> {c.kept}{note}; prefill {tf:.2f} TFLOPs")
    if args.csv:
        write_csv(args.csv, rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": asdict(shape), "rows": [asdict(r) for r in rows]}, indent=2))
    return 0
