"""Pure tensor functions shared by every method and adapter: scores and grid geometry in, kept tokens out.

Nothing here imports a model, a method or a tool (the import contract in ``.importlinter`` holds it).
Conventions used throughout:

* ``S`` tokens per side of one view (``image_size // patch_size``), ``N = S * S`` tokens per view;
* ``grid = (nph, npw)``: crops per column and per row of the AnyRes grid, ``n = nph * npw`` crops;
* crop tensors are ``(n, N)`` with crops in row-major order and tokens row-major inside a crop,
  exactly the order of the views produced by the LLaVA-NeXT processor;
* "grid space" is the same data laid out as one big ``(nph * S, npw * S)`` map.

Submodules: ``geometry`` (grids, unpadding, crop regions), ``budgets`` (crop ratios, exact splits),
``selection`` (top-k primitives), ``assembly`` (the LLM's visual sequence), ``scoring`` (token ratings
with or without [CLS]), ``context`` (``ImageContext``/``Selection`` and friends). Their functions are
re-exported here: ``from globalcom2 import core; core.assemble_order(...)``.
"""

from .assembly import assemble_order
from .budgets import (
    allocate_exact,
    count_kept,
    exact_total,
    hold_views,
    largest_remainder,
    softmax_retention,
    water_fill,
)
from .context import ImageContext, PruneContext, Selection, Stage, canonical_selection
from .geometry import (
    box_mask,
    crop_region_stats,
    crop_region_weights,
    crop_regions,
    crops_to_grid,
    global_crop_scores,
    grid_to_crops,
    thumbnail_to_grid,
    unpadded_box,
)
from .scoring import cls_attention
from .selection import keep_top_per_row, normalized_masked, top_indices

__all__ = [
    "assemble_order",
    "allocate_exact",
    "count_kept",
    "exact_total",
    "hold_views",
    "largest_remainder",
    "softmax_retention",
    "water_fill",
    "ImageContext",
    "PruneContext",
    "Selection",
    "Stage",
    "canonical_selection",
    "box_mask",
    "crop_region_stats",
    "crop_region_weights",
    "crop_regions",
    "crops_to_grid",
    "global_crop_scores",
    "grid_to_crops",
    "thumbnail_to_grid",
    "unpadded_box",
    "cls_attention",
    "keep_top_per_row",
    "normalized_masked",
    "top_indices",
]
