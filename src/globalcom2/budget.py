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
* methods that decide their emission order themselves give their count as ``fixed_count(ctx)``:
  VisionZip ``(1 + n) K``, K = max(1, round(N R)); DivPrune ``round(R T)`` of the T stock tokens
  (``granularity="view"``: round(R n_v) per view, no newlines); DART ``P_img + P TOPK`` (a prompt with
  at least ``pivot_text_tokens`` text tokens); CDPruner with ``budget="exact"``: max(1, round(R n_v))
  of every view's n_v unpadded tokens plus stock's newlines (its default drops the picks that land in
  the letterbox padding, a count that depends on the pixels);
* newlines: layout "authors" puts one after every row of the padded grid (nph S), "spatial" one
  after every unpadded row (H, as stock), "flat" none.

The count is computed by the method itself (its ``fixed_budget``) and the same assembly code the
model runs (``order``), so the formula and the emitted tokens cannot drift apart.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from .methods import MethodConfig, make_config
from .methods.base import ImageContext, Selection
from .models import adapter_for
from .patch import get_config

__all__ = ["num_image_tokens"]


def _split(config_or_model: Any) -> tuple[Any, torch.nn.Module | None]:
    """(model config, model or None), with a clear error for anything but a supported model or config."""
    if isinstance(config_or_model, torch.nn.Module):
        return config_or_model.config, config_or_model
    adapter_for(config_or_model, "config_or_model")  # TypeError naming the supported classes
    return config_or_model, None


def _image_size(image_size: Any) -> tuple[int, int]:
    """(height, width) as two positive ints; TypeError/ValueError naming ``image_size`` otherwise."""
    if isinstance(image_size, torch.Tensor):
        image_size = image_size.tolist()
    try:
        h, w = image_size
    except (TypeError, ValueError):
        raise TypeError(f"image_size must be a (height, width) pair of positive ints, got {image_size!r}") from None
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in (h, w)):
        raise TypeError(f"image_size must be a (height, width) pair of positive ints, got {image_size!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be a (height, width) pair of positive ints, got {image_size!r}")
    return int(h), int(w)


def geometry_context(cfg: MethodConfig, config: Any, image_size: tuple[int, int]) -> ImageContext:
    """An ``ImageContext`` holding the geometry of one image (zero scores), from the model family's adapter."""
    return adapter_for(config).geometry_context(cfg, config, image_size)


def canonical_selection(ctx: ImageContext, k0: int, k: torch.Tensor) -> Selection:
    """A selection with ``k0`` thumbnail tokens and the first ``k[j]`` unpadded tokens of crop j."""
    rank = ctx.valid.long().cumsum(1)  # (n, N) 1-based rank among the unpadded tokens
    crop_keep = ctx.valid & (rank <= k.to(rank.device)[:, None])  # (n, N)
    return Selection(torch.arange(k0), crop_keep, torch.zeros(ctx.valid.shape[0], dtype=torch.float64))


def num_image_tokens(
    config_or_model: Any, image_size: Any, method: str | MethodConfig | None = None, **options: Any
) -> int:
    """Visual tokens the language model receives for one image of ``image_size`` = (height, width).

    ``config_or_model``: a supported model or its config, e.g. a ``LlavaNextConfig`` (checked like ``apply``
    checks it).
    ``method`` and ``options`` as for ``apply``; ``method=None`` means the config a patched model runs
    with (plus ``options``), or ``"globalcom2"``. Raises ValueError where the count depends on the
    image's content (pass ``budget="exact"``) and for methods that prune inside the language model.
    """
    model_cfg, model = _split(config_or_model)
    if method is None:
        method = (get_config(model) if model is not None else None) or "globalcom2"
    if not isinstance(method, (str, MethodConfig)):
        raise TypeError(f"method must be a method name or a MethodConfig, got {type(method).__name__}")
    cfg = make_config(method, **options)
    adapter = adapter_for(config_or_model)
    if model is not None:
        adapter.check_model(model)
    else:
        adapter.check_config(model_cfg)
    if hasattr(adapter, "method_config"):  # what the method runs as on this family
        cfg = adapter.method_config(cfg, model_cfg)
    size = _image_size(image_size)
    if cfg.where == "llm":
        raise ValueError(
            f"method {cfg.name!r} prunes inside the language model: every image enters it with stock "
            "LLaVA-NeXT's token count and is shortened layer by layer; num_image_tokens covers the "
            "vision-side methods"
            + (f" ({cfg.name}'s vision-side form is form='embedding')" if "form" in cfg.option_names() else "")
        )
    if hasattr(adapter, "check_method"):
        adapter.check_method(cfg)
    if model is not None:
        cfg.check_model(model)
    if not hasattr(cfg, "fixed_budget") and not hasattr(cfg, "fixed_count"):
        raise ValueError(f"method {cfg.name!r} does not declare a token count that depends on the image size only")
    if hasattr(adapter, "num_image_tokens"):  # a family with its own layout counts its own tokens
        return adapter.num_image_tokens(cfg, model_cfg, size)
    ctx = geometry_context(cfg, model_cfg, size)
    if hasattr(cfg, "fixed_count"):  # methods that emit their own order (merged tokens, stock sequence subsets)
        return int(cfg.fixed_count(ctx))
    k0, k = cfg.fixed_budget(ctx)
    return int(cfg.order(canonical_selection(ctx, k0, k), ctx).numel())
