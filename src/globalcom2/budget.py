"""How many visual tokens an image becomes, from its size alone: what a serving engine needs up front.

A serving engine (vLLM, ...) expands each ``<image>`` into a fixed number of placeholder tokens
*before* the model runs, from the image size alone. ``num_image_tokens`` gives that number for a
method and its options; it exists whenever the method's count does not depend on the pixels
(``budget="exact"`` makes GlobalCom²'s count so). For one image of (height, width) on a model with
views of S x S tokens (N = S²), a crop grid of nph x npw crops and N_j unpadded tokens in crop j:

    K = k_thumbnail + k_crops + k_newlines

* GlobalCom² (and its variants, ``random``) with ``budget="exact"``: k_thumbnail = int(N R),
  k_crops = round(R sum_j N_j) (halves up), capped so that K never exceeds N + H (W + 1), the stock
  count of the H x W unpadded box;
* with ``allocation="uniform"`` (any budget) and FasterVLM: the sum of every view's own count;
* ``composed``: GlobalCom²'s count with the same allocation, budget and layout, whatever the selector;
* methods that decide their emission order themselves count it in their ``token_count(ctx)``:
  VisionZip ``(1 + n) K``, K = max(1, round(N R)); DivPrune ``round(R T)`` of the T stock tokens
  (``granularity="view"``: round(R n_v) per view, no newlines); DART ``P_img + P TOPK`` (a prompt with
  at least ``pivot_text_tokens`` text tokens); CDPruner with ``budget="exact"``: max(1, round(R n_v))
  of every view's n_v unpadded tokens plus stock's newlines (its default drops the picks that land in
  the letterbox padding, a count that depends on the pixels);
* newlines: layout "authors" puts one after every row of the padded grid (nph S), "spatial" one
  after every unpadded row (H, as stock), "flat" none.
* Qwen2.5-VL / Qwen3-VL (no thumbnail, no newlines): the image is first resized by the processor's
  ``smart_resize`` (``processor=`` gives its min/max pixels) to H x W merged tokens, T = H W; GlobalCom²
  with ``budget="exact"`` keeps round(R T), counted over the regions, the pooled global view never emitted.

The count is computed by the method itself (``VisionMethod.token_count``: its ``size_budget`` assembled
by the same ``order`` the model runs, or its own rule) on the context the family's adapter builds for the
image size (``FamilyAdapter.token_count``), so the formula and the emitted tokens cannot drift apart.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .methods import MethodConfig
from .models import adapter_for
from .patch import config_from, get_config

__all__ = ["num_image_tokens", "stock_image_tokens"]


def _split(config_or_model: Any) -> tuple[Any, torch.nn.Module | None]:
    """(model config, model or None), with a clear error for anything but a supported model or config."""
    if isinstance(config_or_model, torch.nn.Module):
        return config_or_model.config, config_or_model
    adapter_for(config_or_model, "config_or_model")  # TypeError naming the supported classes
    return config_or_model, None


def image_size_pair(image_size: Any, name: str = "image_size") -> tuple[int, int]:
    """(height, width) as two positive ints; TypeError/ValueError naming ``name`` otherwise."""
    if isinstance(image_size, torch.Tensor):
        image_size = image_size.tolist()
    try:
        h, w = image_size
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (height, width) pair of positive ints, got {image_size!r}") from None
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in (h, w)):
        raise TypeError(f"{name} must be a (height, width) pair of positive ints, got {image_size!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {image_size!r}")
    return int(h), int(w)


def _config(model, method, options: dict[str, Any]) -> MethodConfig:
    """The method config a count is for: ``apply``'s rule (a name or config, then ``options``); with
    ``method=None``, a patched model's running config (options given: that method, rebuilt from its
    defaults and the options exactly as ``apply(model, name, **options)`` would), else "globalcom2"."""
    running = get_config(model) if model is not None else None
    if method is None:
        if running is not None and not options:
            return running
        method = running.name if running is not None else "globalcom2"
    return config_from(method, options)


def stock_image_tokens(config_or_model: Any, image_size: Any, processor: Any = None) -> int:
    """Visual tokens the stock (unpatched) model feeds its LLM for one image of ``image_size`` = (height, width).

    processor: as for ``num_image_tokens``.
    """
    model_cfg, model = _split(config_or_model)
    adapter = adapter_for(config_or_model)
    adapter.check_model(model) if model is not None else adapter.check_config(model_cfg)
    return adapter.stock_token_count(model_cfg, image_size_pair(image_size), processor)


def num_image_tokens(
    config_or_model: Any,
    image_size: Any,
    method: str | MethodConfig | None = None,
    *,
    processor: Any = None,
    **options: Any,
) -> int:
    """Visual tokens the language model receives for one image of ``image_size`` = (height, width).

    ``config_or_model``: a supported model or its config, e.g. a ``LlavaNextConfig`` (checked like ``apply``
    checks it).
    ``method`` and ``options`` as for ``apply`` (the same words give the same config): ``method=None`` means
    the config a patched model runs with when no options are given, that method rebuilt from its defaults
    and ``options`` when some are, and ``"globalcom2"`` on an unpatched model or a config. Raises ValueError
    where the count depends on the image's content (pass ``budget="exact"``) and for methods that prune
    inside the language model.
    ``processor``: the model's processor, its image processor, or a mapping of their settings; required where
    the image size the model sees is the processor's own resize (Qwen2.5-VL / Qwen3-VL: ``smart_resize``
    between its ``min_pixels`` and ``max_pixels``, which the model config does not hold), ignored elsewhere.
    """
    model_cfg, model = _split(config_or_model)
    cfg = _config(model, method, options)
    adapter = adapter_for(config_or_model)
    if model is not None:
        adapter.check_model(model)
    else:
        adapter.check_config(model_cfg)
    cfg = adapter.resolve(cfg, model_cfg)  # what the method runs as on this family; refuses what cannot run
    size = image_size_pair(image_size)
    if cfg.where == "llm":
        raise ValueError(
            f"method {cfg.name!r} prunes inside the language model: every image enters it with its stock "
            "token count and is shortened layer by layer; num_image_tokens covers the vision-side methods"
            + (f" ({cfg.name}'s vision-side form is form='embedding')" if cfg.forms else "")
        )
    if model is not None:
        cfg.check_model(model)
    count = adapter.token_count(cfg, model_cfg, size, processor)
    if count is None:
        raise ValueError(cfg.content_dependence())
    return int(count)
