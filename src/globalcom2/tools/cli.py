"""globalcom2 command line: demo, generate, methods, and the tools (flops, bench, viz, report).

Each tool module exposes ``main(argv) -> int`` and is imported only when its command runs, so optional
dependencies (matplotlib, tqdm) are needed only by the command that uses them, and ``--help`` loads no torch.
A bad flag is a one-line error naming it; any other error a command raises is one line too (exit status 1;
``GLOBALCOM2_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import importlib
import sys

from . import common
from .common import Parser, method_config, run_verb

TOOLS = {
    "flops": ("globalcom2.tools.flops", "analytic prefill FLOPs / KV cache (paper Eq. 8, Tables VI-VII)"),
    "bench": ("globalcom2.tools.bench", "measured vision / compression / prefill / decode time and memory"),
    "serve-bench": ("globalcom2.integrations.vllm.serve_bench", "vllm serve under load: stock vs the plugin"),
    "viz": ("globalcom2.tools.viz", "picture of the tokens a method keeps (paper Fig. 4)"),
    "report": ("globalcom2.tools.report", "paper-style relative-score table from lmms-eval result files"),
}


def _add_method_args(p: Parser) -> None:
    p.add_argument("--method", default="globalcom2", help="compression method (see `globalcom2 methods`)")
    p.add_argument("--ratio", type=float, default=0.25, help="retention ratio R in (0, 1]")


def demo_main(argv: list[str]) -> int:
    """``globalcom2 demo``: the whole pipeline offline on a tiny random-weight model."""
    p = Parser(prog="globalcom2 demo", description="offline demo on a tiny random-weight model (its answers are noise)")
    _add_method_args(p)
    p.add_argument(
        "--family",
        default="llava_next",
        help="model family of the tiny demo model: llava_next (default), llava_onevision, internvl, ...",
    )
    p.add_argument(
        "--out",
        default="globalcom2-demo.png",
        help="where to save the picture of kept tokens (needs the viz extra: matplotlib)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats for the prefill ratio")
    args = p.parse_args(argv)
    common.known_family(p, args.family)
    cfg = method_config(p, args.method, args.ratio)
    if cfg.where != "vision":
        why = "the demo shows a vision-side method (`globalcom2 methods` marks them [vision])"
        p.fail("--method", args.method, f"{why}; `globalcom2 bench --tiny` measures in-LLM methods")
    if args.repeats < 1:
        p.fail("--repeats", args.repeats, "must be >= 1")
    from ..testing import DEMO_MODELS
    from .demo import check_family, run_demo

    model, processor = DEMO_MODELS[args.family]()
    try:
        check_family(model, cfg)
    except ValueError as err:
        p.fail("--method", args.method, err)
    if args.out:
        common.writable(p, "--out", args.out)
    return run_demo(method=args.method, ratio=args.ratio, out=args.out, repeats=args.repeats, family=args.family,
                    model=model, processor=processor)  # fmt: skip


def generate_main(argv: list[str]) -> int:
    """``globalcom2 generate``: answer a prompt about an image with a local checkpoint of any supported family."""
    p = Parser(prog="globalcom2 generate", description="answer a prompt about an image with a local checkpoint")
    p.add_argument("--model", required=True, help="local directory of a checkpoint of a supported family (-hf format)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question (chat template applied unless it holds the image token)")
    _add_method_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 elsewhere")  # fmt: skip
    args = p.parse_args(argv)
    stock = args.method in ("none", "stock")
    cfg = None if stock else method_config(p, args.method, args.ratio)
    common.checkpoint_dir(p, "--model", args.model)
    common.existing_file(p, "--image", args.image)  # before any model is loaded
    if args.max_new_tokens < 1:
        p.fail("--max-new-tokens", args.max_new_tokens, "must be >= 1")

    from PIL import Image

    from .. import apply
    from ..models import adapter_for
    from .common import image_prompt, load_checkpoint

    try:
        image = Image.open(args.image).convert("RGB")
    except OSError as err:
        p.fail("--image", args.image, f"not an image PIL can read ({err})")
    device = common.resolve_device(args.device)
    try:
        model, processor = load_checkpoint(args.model, common.resolve_dtype(args.dtype, device), device)
    except TypeError as err:
        p.fail("--model", args.model, err)
    if cfg is not None:
        try:
            apply(model, cfg)
        except ValueError as err:
            p.fail("--method", args.method, err)
    adapter = adapter_for(model)
    inputs = processor(images=[image], text=[image_prompt(processor, args.prompt)], return_tensors="pt")
    inputs = dict(inputs.to(device), **adapter.processor_kwargs(processor, [image]))
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def methods_main(argv: list[str]) -> int:
    """``globalcom2 methods``: the registered methods, where each prunes, and what it is."""
    Parser(prog="globalcom2 methods", description="list the registered compression methods").parse_args(argv)
    from ..methods import REGISTRY

    for name, cls in REGISTRY.items():
        print(f"{name:24s} [{cls.where:6s}] {cls.description}")
    return 0


VERBS = {
    "demo": (demo_main, "offline demo on a tiny random-weight model (LLaVA-NeXT by default)"),
    "generate": (generate_main, "answer a prompt about an image with a local checkpoint"),
    "methods": (methods_main, "list the registered compression methods"),
}


def _tool_main(name: str):
    return lambda argv: importlib.import_module(TOOLS[name][0]).main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``globalcom2`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in VERBS:
        return run_verb(argv[0], VERBS[argv[0]][0], argv[1:])
    if argv and argv[0] in TOOLS:
        return run_verb(argv[0], _tool_main(argv[0]), argv[1:])
    parser = Parser(prog="globalcom2", description=common.summary(__doc__))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in {**VERBS, **TOOLS}.items():
        sub.add_parser(name, help=help_text, add_help=False)
    parser.parse_args(argv)  # only --help or an unknown command get here
    return 2  # pragma: no cover - parse_args exits


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
