"""``apply`` / ``remove``: patch one model instance by swapping its class for a generated subclass.

The state (the method config) lives on the instance; the library class is never edited, a second
instance in the same process is untouched, and ``remove`` restores the original class.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import nn

from .methods import MethodConfig, make_config
from .models import adapter_for, llm_pruning
from .models.base import check_pixel_values

_STATE = "_globalcom2_config"
_ORIGINAL = "_globalcom2_original_class"


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` currently carries a globalcom2 patch."""
    return hasattr(model, _ORIGINAL)


def get_config(model: nn.Module) -> MethodConfig | None:
    """The method config a patched model runs with, or None."""
    return getattr(model, _STATE, None)


def apply(model: nn.Module, method: str | MethodConfig = "globalcom2", **options: Any) -> nn.Module:
    """Compress the visual tokens of this model instance; returns the model.

    ``method`` is a registered name (see ``available_methods()``) or a config object; ``options``
    are that method's fields, e.g. ``retention_ratio=0.25``, and start from the method's defaults (not
    from the config the model ran before). Calling ``apply`` again reconfigures. ``num_image_tokens(model,
    size, method, **options)`` follows the same rule, so it counts exactly what ``apply`` with the same
    words runs. Everything is validated before the model is touched, so a bad call leaves it as it was.
    """
    cfg = config_from(method, options)
    adapter = adapter_for(model)
    adapter.check_model(model)
    cfg = adapter.resolve(cfg, model.config)  # what the method runs as on this family; refuses what cannot run
    if cfg.where == "llm":
        llm_pruning.check_language_model(adapter.language_model(model))
    cfg.check_model(model)
    if not is_patched(model):
        original = type(model)
        patched = type(f"GlobalCom2{original.__name__}", (_PatchedMixin, original), {"__module__": __name__})
        patched.forward = _wrap_forward(original)
        setattr(model, _ORIGINAL, original)
        model.__class__ = patched
    setattr(model, _STATE, cfg)
    return model


def config_from(method: Any, options: dict[str, Any]) -> MethodConfig:
    """``make_config(method, **options)`` with a TypeError naming ``method`` for anything but a name or a config."""
    if isinstance(method, (str, MethodConfig)):
        return make_config(method, **options)
    hint = ""
    if isinstance(method, (int, float)) and not isinstance(method, bool):
        hint = f"; did you mean retention_ratio={method!r}?"
    raise TypeError(f"method must be a method name or a MethodConfig, got {type(method).__name__}{hint}")


def remove(model: nn.Module) -> nn.Module:
    """Undo ``apply``: the model behaves exactly like a never-patched one again. Returns the model."""
    if is_patched(model):
        model.__class__ = getattr(model, _ORIGINAL)
        delattr(model, _ORIGINAL)
        if hasattr(model, _STATE):
            delattr(model, _STATE)
    return model


# --------------------------------------------------------------------------------------------


def _prepare(model, input_ids, pixel_values, attention_mask, labels, padding_side, vision_kwargs):
    """Compressed ``inputs_embeds`` and friends for a batch straight from the processor."""
    if input_ids is None:
        raise ValueError(
            "input_ids are required with pixel_values while compression is on (they mark where each "
            "image goes); pass the processor's output unchanged"
        )
    cfg = getattr(model, _STATE)
    adapter = adapter_for(model)
    check_pixel_values(pixel_values)
    batch = adapter.prepare_images(model, cfg, pixel_values, vision_kwargs, input_ids, attention_mask)
    packed = adapter.pack(
        model, input_ids, attention_mask, batch.features, batch.stock_counts, labels=labels, padding_side=padding_side,
        batch=batch,
    )  # fmt: skip
    return packed, batch.records


@contextlib.contextmanager
def _in_llm(model, packed):
    """Context of the stock call: the family's (``lm_call_context``: Qwen-VL's M-RoPE positions and DeepStack),
    then the pruning hooks of in-LLM methods, which therefore see what the family hands the language model."""
    cfg = getattr(model, _STATE)
    adapter = adapter_for(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(adapter.lm_call_context(model, packed))
        if cfg.where == "llm":
            stack.enter_context(llm_pruning.pruning(model, cfg, packed.image_spans, adapter.language_model(model)))
        yield


def _check_call(model, kwargs: dict) -> None:
    """The adapter's refusal of call options it cannot compress (e.g. OneVision's video inputs)."""
    adapter_for(model).check_call(model, kwargs)


def _has_images(pixel_values) -> bool:
    """Whether the call carries images (a non-empty ``pixel_values``); a list is refused by name later."""
    if pixel_values is None:
        return False
    if isinstance(pixel_values, torch.Tensor):
        return pixel_values.numel() > 0
    return True


def _padding_side(attention_mask: torch.Tensor | None) -> str:
    if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
        return "right"
    return "left"


def _wrap_forward(original: type):
    stock_forward = original.forward

    @functools.wraps(stock_forward)
    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        _check_call(self, kwargs)
        if not _has_images(pixel_values):
            return stock_forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("pass input_ids, not inputs_embeds, together with pixel_values")
        if kwargs.get("position_ids") is not None:
            raise ValueError(
                "position_ids cannot be given with pixel_values while compression is on: they describe the "
                "uncompressed sequence; leave them out and they are derived from the shortened attention mask"
            )
        labels = kwargs.pop("labels", None)
        if getattr(self, _STATE).where == "llm":
            if labels is not None:
                raise ValueError("labels are not supported with in-LLM methods (the sequence shrinks inside the model)")
            llm_pruning.check_call_options(self, kwargs)
        vision_kwargs = {k: kwargs.pop(k) for k in adapter_for(self).vision_kwargs if k in kwargs}
        side = _padding_side(attention_mask)
        packed, _ = _prepare(self, input_ids, pixel_values, attention_mask, labels, side, vision_kwargs)
        with _in_llm(self, packed):
            return stock_forward(
                self,
                inputs_embeds=packed.inputs_embeds,
                attention_mask=packed.attention_mask,
                position_ids=packed.position_ids,
                labels=packed.labels,
                **kwargs,
            )

    return forward


class _PatchedMixin:
    """Methods of the generated subclass. ``forward`` is attached per original class."""

    def save_pretrained(self, *args, **kwargs):
        """Stock ``save_pretrained`` as the original class: the checkpoint names the stock architecture
        (stock ``from_pretrained`` loads it; the patch is not saved) and ``self.config`` is left unchanged."""
        patched, original = type(self), getattr(self, _ORIGINAL)
        subs = (getattr(self.config, k, None) for k in getattr(self.config, "sub_configs", {}))
        configs = [self.config, *(c for c in subs if c is not None)]
        saved = [dict(vars(c)) for c in configs]  # stock saving writes architectures/dtype into them
        self.__class__ = original
        try:
            return original.save_pretrained(self, *args, **kwargs)
        finally:
            self.__class__ = patched
            for c, attrs in zip(configs, saved):
                vars(c).clear()
                vars(c).update(attrs)

    def generate(self, inputs=None, *args, pixel_values=None, attention_mask=None, **kwargs):
        """Stock ``generate`` on the compressed prompt; returns prompt ids + new tokens like stock."""
        input_ids = kwargs.pop("input_ids", inputs)
        stock = super().generate
        _check_call(self, kwargs)
        if not _has_images(pixel_values):
            return stock(input_ids, *args, attention_mask=attention_mask, **kwargs)
        if input_ids is None:
            raise ValueError(
                "input_ids are required with pixel_values while compression is on (they mark where each "
                "image goes); pass the processor's output unchanged"
            )
        if getattr(self, _STATE).where == "llm":
            llm_pruning.check_call_options(self, kwargs)
        _translate_lengths(self, kwargs, input_ids.shape[1])
        vision_kwargs = {k: kwargs.pop(k) for k in adapter_for(self).vision_kwargs if k in kwargs}
        with torch.no_grad():  # like stock generate: no autograd graph for the prompt
            packed, _ = _prepare(self, input_ids, pixel_values, attention_mask, None, "left", vision_kwargs)
        with _in_llm(self, packed):
            out = stock(*args, inputs_embeds=packed.inputs_embeds, attention_mask=packed.attention_mask, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)
        full = torch.cat([prompt.to(sequences.device), sequences], dim=1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out


def _translate_lengths(model, kwargs: dict, prompt_len: int) -> None:
    """Turn ``max_length``/``min_length`` (counted on the uncompressed prompt) into new-token counts.

    Like stock ``generate``, a ``max_length`` that leaves no room after the prompt is a ValueError.
    """
    gen_cfg = kwargs.get("generation_config")
    max_length, source = None, "max_length"
    if kwargs.get("max_new_tokens") is None:
        if kwargs.get("max_length") is not None:
            max_length = int(kwargs["max_length"])
        elif gen_cfg is not None and gen_cfg.max_new_tokens is None and gen_cfg.max_length is not None:
            max_length, source = int(gen_cfg.max_length), "generation_config.max_length"
    if max_length is not None:
        if max_length <= prompt_len:
            raise ValueError(
                f"{source} ({max_length}) must be greater than the prompt length ({prompt_len} tokens of "
                "input_ids, counted before compression); raise it or pass max_new_tokens instead"
            )
        kwargs["max_new_tokens"] = max_length - prompt_len
    kwargs.pop("max_length", None)
    if kwargs.get("min_length") is not None and kwargs.get("min_new_tokens") is None:
        kwargs["min_new_tokens"] = max(int(kwargs.pop("min_length")) - prompt_len, 0)
    kwargs.pop("min_length", None)
