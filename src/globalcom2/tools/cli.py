"""``globalcom2`` command line: demo, generate, and the tools (flops, bench, viz).

Each tool module exposes ``main(argv) -> int``; they are imported only when their command runs,
so optional dependencies (matplotlib, tqdm) are needed only by the command that uses them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

TOOLS = {
    "flops": ("globalcom2.tools.flops", "analytic prefill FLOPs / KV cache (paper Eq. 8, Tables VI-VII)"),
    "bench": ("globalcom2.tools.bench", "measured vision / compression / prefill / decode time and memory"),
    "serve-bench": ("globalcom2.integrations.vllm.serve_bench", "vllm serve under load: stock vs the plugin"),
    "viz": ("globalcom2.tools.viz", "picture of the tokens a method keeps (paper Fig. 4)"),
    "report": ("globalcom2.tools.report", "paper-style relative-score table from lmms-eval result files"),
}


def _add_method_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="globalcom2", help="compression method (see `globalcom2 methods`)")
    p.add_argument("--ratio", type=float, default=0.25, help="retention ratio R in (0, 1]")


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(method=args.method, ratio=args.ratio, out=args.out, repeats=args.repeats)


def _generate(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from .. import apply

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    processor = AutoProcessor.from_pretrained(args.model, local_files_only=True)
    model = LlavaNextForConditionalGeneration.from_pretrained(args.model, dtype=dtype, local_files_only=True)
    model = model.to(args.device).eval()
    if args.ratio < 1.0 or args.method != "globalcom2":
        apply(model, method=args.method, retention_ratio=args.ratio)
    image = Image.open(args.image).convert("RGB")
    prompt = args.prompt
    if "<image>" not in prompt:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt").to(args.device)
    out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


def _methods(args: argparse.Namespace) -> int:
    from ..methods import REGISTRY

    for name, cls in REGISTRY.items():
        print(f"{name:24s} [{cls.where:6s}] {cls.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``globalcom2`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)

    parser = argparse.ArgumentParser(prog="globalcom2", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="offline demo on a tiny random-weight LLaVA-NeXT")
    _add_method_args(p)
    p.add_argument(
        "--out",
        default="globalcom2-demo.png",
        help="where to save the picture of kept tokens (needs the viz extra: matplotlib)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed repeats for the prefill ratio")
    p.set_defaults(func=_demo)

    p = sub.add_parser("generate", help="answer a prompt about an image with a local checkpoint")
    p.add_argument("--model", required=True, help="local path of a LLaVA-NeXT checkpoint (llava-hf format)")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--prompt", required=True, help="question; a chat template is applied unless it has <image>")
    _add_method_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="float16" if _cuda() else "float32", choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=_generate)

    p = sub.add_parser("methods", help="list the registered compression methods")
    p.set_defaults(func=_methods)

    for name, (_, help_text) in TOOLS.items():
        sub.add_parser(name, help=help_text, add_help=False)

    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
