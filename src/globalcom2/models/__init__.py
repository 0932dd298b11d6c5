"""Model adapters: one module per model family, and the lookup that picks one for a model or config.

An adapter module is the only place that knows a family's classes, geometry and views. It exposes:

* ``FAMILY`` (a short name), ``SUPPORTED_CLASSES`` (model class names) and ``CONFIG_CLASSES``
  (config class names) — how ``adapter_for`` recognises it;
* ``VISION_KWARGS``: the keyword arguments of the stock ``forward``/``generate`` that describe the
  images (e.g. ``image_sizes``) and that the patched model consumes on the vision side;
* ``check_config(config)`` / ``check_model(model)``: raise a clear error unless supported;
* ``prepare_images(model, cfg, pixel_values, vision_kwargs, input_ids, attention_mask)`` ->
  ``(features per image (T_i, D), stock placeholder count per image, records or None)``;
* ``geometry_context(cfg, config, image_size)``: an ``ImageContext`` with the geometry of one image
  (what ``num_image_tokens`` counts on);
* ``pack(...)``: splice the features into the prompt (shared: ``models.common.pack``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import internvl, llava_next, llava_onevision

__all__ = ["FAMILIES", "adapter_for", "internvl", "llava_next", "llava_onevision"]

#: every adapter module, in the order ``adapter_for`` tries them
FAMILIES: tuple[ModuleType, ...] = (llava_next, llava_onevision, internvl)


def _supported() -> str:
    return ", ".join(c for a in FAMILIES for c in a.SUPPORTED_CLASSES)


def adapter_for(model_or_config: Any, argument: str = "model") -> ModuleType:
    """The adapter module for a model instance or its config; TypeError naming the supported classes otherwise."""
    names = {c.__name__ for c in type(model_or_config).__mro__}
    for adapter in FAMILIES:
        if names.intersection(adapter.SUPPORTED_CLASSES) or names.intersection(adapter.CONFIG_CLASSES):
            return adapter
    configs = ", ".join(c for a in FAMILIES for c in a.CONFIG_CLASSES)
    raise TypeError(
        f"{argument} must be one of ({_supported()}) from transformers (or, where a config is accepted, one "
        f"of ({configs})); got {type(model_or_config).__name__}"
    )
