"""Assembly: which feature goes where in the language model's input."""

from __future__ import annotations

import torch

from .geometry import crops_to_grid


def assemble_order(
    thumb_keep: torch.Tensor,
    crop_keep: torch.Tensor,
    valid: torch.Tensor,
    grid: tuple[int, int],
    side: int,
    layout: str = "authors",
    box: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Order of the visual tokens handed to the language model, as indices into
    ``concat(views.flatten(0, 1), newline)``: view v token p is ``v * N + p``, the newline is
    ``(1 + n) * N``.

    thumb_keep: (k0,) thumbnail token indices in emission order.
    crop_keep:  (n, N) bool kept crop tokens at their true positions.
    valid:      (n, N) bool unpadded crop tokens.
    layout:
      "authors" -- as the authors' ``compress_crops``: the i-th kept token (in unpadded
          order) of a crop is written to slot i of that crop's S x S block, the blocks are
          read in raster order of the whole padded grid and every one of its ``nph * S``
          rows ends with a newline.
      "spatial" -- kept tokens at their true positions in raster order, one newline per
          unpadded row, as stock LLaVA-NeXT lays out its (uncompressed) features. The rows are
          those of ``box`` (``unpadded_box``) when given: stock still ends every row of an image
          so thin that no column survives unpadding with a newline.
      "flat" -- kept tokens at their true positions in raster order of the whole grid, no
          newlines (FasterVLM's LLaVA-NeXT path).
    returns: (T,) long.
    """
    n, N = crop_keep.shape
    newline = (1 + n) * N
    dev = crop_keep.device
    src = (torch.arange(n, device=dev)[:, None] + 1) * N + torch.arange(N, device=dev)[None, :]  # (n, N)
    if layout == "authors":
        slot = valid.long().cumsum(1) - 1  # unpadded rank of each position
        crop, pos = crop_keep.nonzero(as_tuple=True)
        mask = torch.zeros_like(crop_keep)
        mask[crop, slot[crop, pos]] = True
        moved = torch.zeros_like(src)
        moved[crop, slot[crop, pos]] = src[crop, pos]
        src = moved
        row_has_newline = torch.ones(grid[0] * side, dtype=torch.bool, device=dev)
    elif layout == "spatial":
        mask = crop_keep
        if box is None:
            row_has_newline = crops_to_grid(valid, grid, side).any(dim=1)  # (nph*S,)
        else:
            rows = torch.arange(grid[0] * side, device=dev)
            row_has_newline = (rows >= box[0]) & (rows < box[1])  # (nph*S,)
    elif layout == "flat":
        mask = crop_keep
        row_has_newline = torch.zeros(grid[0] * side, dtype=torch.bool, device=dev)
    else:
        raise ValueError(f"layout must be one of ('authors', 'spatial', 'flat'), got {layout!r}")
    g_mask = crops_to_grid(mask, grid, side)  # (nph*S, npw*S)
    g_src = crops_to_grid(src, grid, side)
    g_mask = torch.cat([g_mask, row_has_newline[:, None]], dim=1)
    g_src = torch.cat([g_src, torch.full_like(g_src[:, :1], newline)], dim=1)
    return torch.cat([thumb_keep.to(dev), g_src[g_mask]])
