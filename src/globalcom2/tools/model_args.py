"""The plugin's ``--model_args``: which keys load the model, which configure the method, and prompt formats.

Pure Python (no lmms-eval), so it is importable and testable without the ``eval`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - imported where used, so that `globalcom2 report` loads no torch
    from ..methods import MethodConfig

#: method names that mean "no patch": the uncompressed baseline row of the paper's tables.
STOCK_METHODS = ("none", "stock")

#: model_args that the plugin itself consumes; every other key is an option of the method.
LOADER_ARGS = (
    "pretrained",
    "method",
    "device",
    "dtype",
    "batch_size",
    "max_batch_size",
    "max_new_tokens",
    "attn_implementation",
    "conv_template",
    "chat_template",
    "use_cache",
    "local_files_only",
)

#: LLaVA's ``vicuna_v1`` conversation (the LLaVA-NeXT authors' evaluation prompt); ``{images}`` = "<image>\n" each.
VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
CONV_TEMPLATES = ("auto", "plain", "vicuna_v1")


def coerce(value: Any) -> Any:
    """A model_args value as lmms-eval parses it: "true"/"false" -> bool, digits -> int, numbers -> float."""
    if not isinstance(value, str):
        return value
    low = value.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(low)
    except ValueError:
        pass
    try:
        return float(low)
    except ValueError:
        return value


@dataclass
class MethodChoice:
    """The compression a run asks for: a validated config, or None for the stock model."""

    method: str
    config: MethodConfig | None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_stock(self) -> bool:
        """Whether the model runs unpatched."""
        return self.config is None


def method_choice(method: str = "globalcom2", **options: Any) -> MethodChoice:
    """Validate ``method`` and its options (via ``make_config``); "none"/"stock" select the unpatched model.

    Raises TypeError naming the valid keys when an option is unknown, ValueError on a bad value.
    """
    from ..methods import make_config

    method = str(method)
    options = {k: coerce(v) for k, v in options.items()}
    if method.lower() in STOCK_METHODS:
        extra = sorted(set(options) - {"retention_ratio"})
        if extra:
            raise TypeError(f"method={method} (stock model) takes no method options, got {', '.join(extra)}")
        ratio = options.get("retention_ratio", 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or float(ratio) != 1.0:
            raise ValueError(f"method={method} is the uncompressed model: retention_ratio must be 1 or left out")
        return MethodChoice(method="none", config=None, options={})
    try:
        config = make_config(method, **options)
    except TypeError as err:
        raise TypeError(
            f"{err}. model_args of --model globalcom2 are the plugin's own "
            f"({', '.join(LOADER_ARGS)}) plus the options of the method"
        ) from None
    return MethodChoice(method=method, config=config, options=options)


def batch_size_arg(value: Any) -> int:
    """lmms-eval's ``--batch_size`` (a string from its CLI) as an int; "auto" is not supported and means 1."""
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        return 1
    size = coerce(value)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {value!r}")
    return size


def fallback_prompt(question: str, n_images: int, conv_template: str = "plain") -> str:
    """LLaVA's single-turn prompt, ``USER: <image>\\nquestion ASSISTANT:``, with the vicuna_v1 system line or not."""
    images = "<image>\n" * n_images if "<image>" not in question else ""
    prompt = f"USER: {images}{question} ASSISTANT:"
    if conv_template == "vicuna_v1":
        prompt = f"{VICUNA_V1_SYSTEM} {prompt}"
    return prompt


def conversation(question: str, n_images: int) -> list[dict[str, Any]]:
    """A one-turn chat for ``processor.apply_chat_template``: the images first, then the question."""
    if "<image>" in question:
        content: list[dict[str, Any]] = [{"type": "text", "text": question}]
    else:
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def truncate(text: str, until: list[str]) -> str:
    """Cut ``text`` at the first occurrence of any stop string, then strip whitespace."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text.strip()
