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
* newlines: layout "authors" puts one after every row of the padded grid (nph S), "spatial" one
  after every unpadded row (H, as stock), "flat" none.

The count is computed by the method itself (its ``fixed_budget``) and the same assembly code the
model runs (``order``), so the formula and the emitted tokens cannot drift apart.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from . import core
from .methods import MethodConfig, make_config
from .methods.base import ImageContext, Selection
from .models import llava_next as adapter
from .patch import get_config

__all__ = ["num_image_tokens"]


def _split(config_or_model: Any) -> tuple[Any, torch.nn.Module | None]:
    """(LlavaNextConfig, model or None), with a clear error for anything else."""
    if isinstance(config_or_model, torch.nn.Module):
        return config_or_model.config, config_or_model
    names = {c.__name__ for c in type(config_or_model).__mro__}
    if "LlavaNextConfig" not in names:
        raise TypeError(
            "config_or_model must be a LlavaNextConfig or a LlavaNextForConditionalGeneration, "
            f"got {type(config_or_model).__name__}"
        )
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


def geometry_context(cfg: MethodConfig, geo: adapter.Geometry, image_size: tuple[int, int]) -> ImageContext:
    """An ``ImageContext`` holding the geometry of one image (zero scores), unpadded as ``cfg`` unpads."""
    grid = geo.grid(image_size)
    if cfg.unpad:
        box = core.unpadded_box(grid, geo.side, image_size, round_digits=cfg.unpad_rounding)
    else:
        box = (0, grid[0] * geo.side, 0, grid[1] * geo.side)
    valid = core.box_mask(box, grid, geo.side)  # (n, N)
    scores = torch.zeros(1 + valid.shape[0], geo.side**2)  # (1 + n, N), never read
    return ImageContext(scores=scores, side=geo.side, grid=grid, valid=valid, box=box)


def canonical_selection(ctx: ImageContext, k0: int, k: torch.Tensor) -> Selection:
    """A selection with ``k0`` thumbnail tokens and the first ``k[j]`` unpadded tokens of crop j."""
    rank = ctx.valid.long().cumsum(1)  # (n, N) 1-based rank among the unpadded tokens
    crop_keep = ctx.valid & (rank <= k.to(rank.device)[:, None])  # (n, N)
    return Selection(torch.arange(k0), crop_keep, torch.zeros(ctx.valid.shape[0], dtype=torch.float64))


def num_image_tokens(
    config_or_model: Any, image_size: Any, method: str | MethodConfig | None = None, **options: Any
) -> int:
    """Visual tokens the language model receives for one image of ``image_size`` = (height, width).

    ``config_or_model``: a ``LlavaNextConfig`` or a LLaVA-NeXT model (checked like ``apply`` checks it).
    ``method`` and ``options`` as for ``apply``; ``method=None`` means the config a patched model runs
    with (plus ``options``), or ``"globalcom2"``. Raises ValueError where the count depends on the
    image's content (pass ``budget="exact"``) and for methods that prune inside the language model.
    """
    llava_cfg, model = _split(config_or_model)
    if method is None:
        method = (get_config(model) if model is not None else None) or "globalcom2"
    if not isinstance(method, (str, MethodConfig)):
        raise TypeError(f"method must be a method name or a MethodConfig, got {type(method).__name__}")
    cfg = make_config(method, **options)
    if model is not None:
        adapter.check_model(model)
    else:
        adapter.check_config(llava_cfg)
    size = _image_size(image_size)
    if cfg.where == "llm":
        raise ValueError(
            f"method {cfg.name!r} prunes inside the language model: every image enters it with stock "
            "LLaVA-NeXT's token count and is shortened layer by layer; num_image_tokens covers the "
            "vision-side methods"
            + (f" ({cfg.name}'s vision-side form is form='embedding')" if "form" in cfg.option_names() else "")
        )
    if model is not None:
        cfg.check_model(model)
    if not hasattr(cfg, "fixed_budget"):
        raise ValueError(f"method {cfg.name!r} does not declare a token count that depends on the image size only")
    geo = adapter.Geometry.from_config(llava_cfg)
    ctx = geometry_context(cfg, geo, size)
    k0, k = cfg.fixed_budget(ctx)
    return int(cfg.order(canonical_selection(ctx, k0, k), ctx).numel())
