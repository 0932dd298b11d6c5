"""Grid geometry of AnyRes views: crop <-> grid layouts, unpadding, crop regions over the thumbnail.

Conventions: ``S`` tokens per side of one view, ``N = S * S``; ``grid = (nph, npw)`` crops per column and
per row, ``n = nph * npw``; crop tensors are ``(n, N)`` row-major; "grid space" is the ``(nph S, npw S)`` map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def crops_to_grid(x: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """(n, N, *rest) crop-major tensor -> (nph * S, npw * S, *rest) grid-space map."""
    nph, npw = grid
    rest = x.shape[2:]
    x = x.reshape(nph, npw, side, side, *rest).transpose(1, 2)  # (nph, S, npw, S, *rest)
    return x.reshape(nph * side, npw * side, *rest)


def grid_to_crops(x: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """(nph * S, npw * S, *rest) grid-space map -> (n, N, *rest) crop-major tensor."""
    nph, npw = grid
    rest = x.shape[2:]
    x = x.reshape(nph, side, npw, side, *rest).transpose(1, 2)  # (nph, npw, S, S, *rest)
    return x.reshape(nph * npw, side * side, *rest)


def unpadded_box(
    grid: tuple[int, int], side: int, image_size: tuple[int, int], round_digits: int | None = None
) -> tuple[int, int, int, int]:
    """Rows/cols of grid space that hold image content (not the processor's letterbox padding).

    image_size: original (height, width) of the image.
    round_digits: None truncates like the authors' code (``int(x)``); 7 rounds first like
        ``transformers``' ``unpad_image`` (``int(round(x, 7))``). They differ only when the
        scaled size lands a hair below an integer.
    returns: (top, bottom, left, right), half-open bounds in grid space.
    """
    nph, npw = grid
    height, width = int(image_size[0]), int(image_size[1])
    cur_h, cur_w = nph * side, npw * side
    if width / height > cur_w / cur_h:
        new_h = height * (cur_w / width)
        new_h = int(round(new_h, round_digits) if round_digits is not None else new_h)
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = width * (cur_h / height)
    new_w = int(round(new_w, round_digits) if round_digits is not None else new_w)
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def box_mask(box: tuple[int, int, int, int], grid: tuple[int, int], side: int, device=None) -> torch.Tensor:
    """(n, N) bool: crop tokens inside the unpadded box."""
    top, bottom, left, right = box
    nph, npw = grid
    rows = torch.arange(nph * side, device=device)
    cols = torch.arange(npw * side, device=device)
    inside = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None, :]
    return grid_to_crops(inside, grid, side)


def crop_regions(side: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """(N,) long: which crop each thumbnail token lies over.

    The thumbnail is the whole image squashed to one view, so the crop grid is laid over it
    with ``S // npw`` by ``S // nph`` token cells; leftover rows/columns join the last crop
    (the authors' rule).
    """
    nph, npw = grid
    cell_h, cell_w = max(side // nph, 1), max(side // npw, 1)
    r = (torch.arange(side, device=device) // cell_h).clamp(max=nph - 1)
    c = (torch.arange(side, device=device) // cell_w).clamp(max=npw - 1)
    return (r[:, None] * npw + c[None, :]).reshape(-1)


def crop_region_weights(side: int, grid: tuple[int, int], device=None) -> torch.Tensor:
    """(n, N) float64: the share of each thumbnail token's area that lies over each crop's region.

    Crop (r, c) of an nph x npw grid covers rows r/nph..(r+1)/nph and columns c/npw..(c+1)/npw of the
    thumbnail; a token straddling a border is split by area (columns sum to 1). Where nph and npw
    divide S the weights are 0/1 and equal ``crop_regions``; elsewhere (e.g. 3 rows of a 16-token
    side) they are the exact overlap, unlike the authors' rule that gives leftover rows to the last crop.
    """
    nph, npw = grid

    def overlap(parts: int) -> torch.Tensor:  # (parts, S): share of token a's extent inside part r
        # in units of 1 / (S * parts): token a spans [a*parts, (a+1)*parts), part r spans [r*S, (r+1)*S)
        a = torch.arange(side, device=device, dtype=torch.float64)[None, :]
        r = torch.arange(parts, device=device, dtype=torch.float64)[:, None]
        lo, hi = torch.maximum(a * parts, r * side), torch.minimum((a + 1) * parts, (r + 1) * side)
        return (hi - lo).clamp(min=0) / parts

    w = overlap(nph)[:, None, :, None] * overlap(npw)[None, :, None, :]  # (nph, npw, S, S)
    return w.reshape(nph * npw, side * side)


def crop_region_stats(
    thumb: torch.Tensor, side: int, grid: tuple[int, int], reduce: str = "sum", weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-crop statistic of the thumbnail scores over each crop's region (paper Eq. 2).

    thumb: (N,) thumbnail scores. reduce: "sum" | "max".
    weights: optional (n, N) area of each token over each crop (``crop_region_weights``); None uses the
        authors' token cells (``crop_regions``). "sum" weighs each token by its area in the crop, "max"
        takes the largest score of the tokens touching the crop.
    returns: (n,) float64.
    """
    n = grid[0] * grid[1]
    if weights is not None:
        w = weights.to(thumb.device, torch.float64)  # (n, N)
        x = thumb.double()[None, :].expand_as(w)
        if reduce == "max":
            return torch.where(w > 0, x, torch.full_like(x, -math.inf)).amax(dim=1)
        return (w * x).sum(dim=1)
    region = crop_regions(side, grid, thumb.device)
    x = thumb.double()
    if reduce == "max":
        out = torch.full((n,), -math.inf, dtype=torch.float64, device=thumb.device)
        return out.scatter_reduce(0, region, x, reduce="amax")
    # index_add_ accumulates in token order on CPU, like the reference's running sum.
    return torch.zeros(n, dtype=torch.float64, device=thumb.device).index_add_(0, region, x)


def thumbnail_to_grid(thumb: torch.Tensor, side: int, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (align_corners=False) of the (N,) thumbnail score map to ``size`` = (h, w) > 0."""
    x = thumb.view(1, 1, side, side)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0, 0]


def global_crop_scores(thumb: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int], side: int) -> torch.Tensor:
    """Global importance of every crop token: the thumbnail map resized onto the unpadded crops.

    thumb: (N,) thumbnail scores; valid: (n, N) bool unpadded crop tokens.
    returns: (n, N) scores, 0 at padded positions.

    The map is resized to the unpadded area and cut into blocks crop by crop. Blocks are
    stacked the way the authors' code stacks them: a row of blocks advances by the height
    of the first crop of the previous row, a block by the widths of the crops to its left.
    """
    nph, npw = grid
    n = nph * npw
    rows_any = valid.view(n, side, side).any(dim=2)  # (n, S)
    cols_any = valid.view(n, side, side).any(dim=1)  # (n, S)
    crop_h = rows_any.sum(1).view(nph, npw)  # (nph, npw)
    crop_w = cols_any.sum(1).view(nph, npw)
    vgrid = crops_to_grid(valid, grid, side)
    box_h = int(vgrid.any(dim=1).sum())
    box_w = int(vgrid.any(dim=0).sum())
    if box_h == 0 or box_w == 0:  # an image so thin that no crop token survives unpadding
        return torch.zeros(n, side * side, dtype=thumb.dtype, device=thumb.device)
    interp = thumbnail_to_grid(thumb, side, (box_h, box_w))  # (box_h, box_w)

    # offset of each crop's block inside the interpolated map
    row_off = torch.cumsum(crop_h[:, 0], 0) - crop_h[:, 0]  # (nph,)
    col_off = torch.cumsum(crop_w, 1) - crop_w  # (nph, npw)
    # first valid row/col inside each crop (crop-local)
    first_r = torch.where(rows_any, torch.arange(side, device=valid.device), side).amin(1).view(nph, npw)
    first_c = torch.where(cols_any, torch.arange(side, device=valid.device), side).amin(1).view(nph, npw)

    local = torch.arange(side, device=valid.device)
    rr = row_off[:, None, None] + local.view(1, 1, side) - first_r[..., None]  # (nph, npw, S)
    cc = col_off[..., None] + local.view(1, 1, side) - first_c[..., None]  # (nph, npw, S)
    rr = rr.clamp(0, box_h - 1).view(n, side, 1)  # padded positions clamp; they are zeroed below
    cc = cc.clamp(0, box_w - 1).view(n, 1, side)
    out = interp[rr, cc].reshape(n, side * side)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
