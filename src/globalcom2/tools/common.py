"""What every ``globalcom2`` verb shares: one-line errors that name the flag, flag checks made before any model
is loaded, loading a local checkpoint of any supported family, and plain-text help.

Nothing heavy is imported at module level: ``--help`` of every verb stays fast (torch and transformers are
imported by the code that needs them, when it runs).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

#: where an error keeps its traceback instead of the one-line message (for debugging the tools themselves)
TRACEBACK_ENV = "GLOBALCOM2_TRACEBACK"


def plain(text: str | None) -> str:
    """``text`` (a docstring line) without reStructuredText markup: ````x```` -> x, ```x``` -> x."""
    return re.sub(r"``([^`]+)``|`([^`]+)`", lambda m: m.group(1) or m.group(2), text or "")


def summary(doc: str | None) -> str:
    """The first line of a module docstring as plain text, for a parser's description."""
    return plain((doc or "").strip().splitlines()[0] if doc and doc.strip() else "")


def one_line(err: BaseException) -> str:
    """An exception's message on one line."""
    return " ".join(str(err).split()) or type(err).__name__


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``PROG: error: MESSAGE (see PROG --help)``, exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(Exception(message))} (see {self.prog} --help)\n")

    def fail(self, flag: str, value: Any, message: Any) -> NoReturn:
        """One-line error naming the flag and the value given: ``--ratio 1.5: retention_ratio must be ...``."""
        shown = " ".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value
        self.error(f"{flag} {shown}: {one_line(message) if isinstance(message, BaseException) else message}")


def method_config(
    parser: Parser,
    method: str,
    ratio: float,
    options: dict | None = None,
    flags: tuple[str, str, str] = ("--method", "--ratio", "--options"),
):
    """The validated config of ``method`` at ``ratio`` with ``options``; a one-line error naming the flag at fault."""
    from ..methods import make_config

    method_flag, ratio_flag, options_flag = flags
    try:
        make_config(method)
    except (TypeError, ValueError) as err:
        import difflib

        from ..methods import REGISTRY

        close = difflib.get_close_matches(str(method), list(REGISTRY), n=1, cutoff=0.8)
        hint = f"did you mean {close[0]!r}? " if close else ""
        parser.fail(method_flag, method, f"{hint}{one_line(err)}")
    try:
        make_config(method, retention_ratio=ratio)
    except (TypeError, ValueError) as err:
        parser.fail(ratio_flag, ratio, err)
    try:
        return make_config(method, retention_ratio=ratio, **(options or {}))
    except (TypeError, ValueError) as err:
        parser.fail(options_flag, options, err)


def known_family(parser: Parser, name: str, flag: str = "--family") -> None:
    """One-line error naming ``flag`` unless ``name`` is a supported family (``models.family_names``); the
    families are not listed as argparse choices, so that ``--help`` imports no model code."""
    from ..models import family_names

    if name not in family_names():
        parser.fail(flag, name, f"must be one of {', '.join(sorted(family_names()))}")


def existing_file(parser: Parser, flag: str, path: str | None) -> None:
    """One-line error naming ``flag`` unless ``path`` (when given) is an existing file."""
    if path is not None and not Path(path).is_file():
        parser.fail(flag, path, "is a directory, not a file" if Path(path).is_dir() else "no such file")


def writable(parser: Parser, flag: str, path: str | None) -> None:
    """One-line error naming ``flag`` unless ``path``'s directory exists (checked before any long run)."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        parser.fail(flag, path, f"no such directory {str(Path(path).parent)!r}")


def checkpoint_dir(parser: Parser, flag: str, path: str | None) -> None:
    """One-line error naming ``flag`` unless ``path`` is a local checkpoint directory (with a config.json)."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        parser.fail(flag, path, "no such local directory (a checkpoint saved with save_pretrained or downloaded "
                    "with `hf download REPO --local-dir DIR`; nothing is fetched from the Hub)")  # fmt: skip
    if not p.is_dir() or not (p / "config.json").is_file():
        parser.fail(flag, path, "not a checkpoint directory (it holds no config.json)")


def load_checkpoint(path: str, dtype: str = "float32", device: str = "cpu"):
    """(model, processor) of a local checkpoint of any supported family: the model class comes from its config's
    family adapter (``models.adapter_for``). Nothing is downloaded."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoProcessor

    from ..models import adapter_for

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    family = adapter_for(config, "the checkpoint's config")  # TypeError naming the supported classes
    model_class = getattr(transformers, family.model_classes[0])
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = model_class.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
    return model.to(device).eval(), processor


def default_device() -> str:
    """ "cuda" where torch sees a GPU, else "cpu" (imports torch: call it when a command runs, not for --help)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(value: str | None) -> str:
    """``--device``'s value, "auto" (or None) meaning ``default_device()``."""
    return default_device() if value in (None, "auto") else value


def resolve_dtype(value: str | None, device: str) -> str:
    """``--dtype``'s value, "auto" (or None) meaning float16 on CUDA and float32 elsewhere."""
    if value in (None, "auto"):
        return "float16" if device.startswith("cuda") else "float32"
    return value


def image_prompt(processor, question: str) -> str:
    """A one-image prompt for ``processor``: ``question`` as is when it holds the processor's image token, else the
    checkpoint's chat template around the image and the question, else the image token, a newline, the question."""
    token = getattr(processor, "image_token", None) or "<image>"
    if token in question:
        return question
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"{token}\n{question}"


def run_verb(name: str, fn, argv: list[str]) -> int:
    """Run a verb's ``main(argv)``; an error it raises becomes one line on stderr and exit status 1 (set
    ``GLOBALCOM2_TRACEBACK=1`` to see the traceback instead)."""
    import os

    try:
        return int(fn(argv) or 0)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError) as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"globalcom2 {name}: error: {one_line(err)}", file=sys.stderr)
        return 1
