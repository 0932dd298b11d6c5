"""Pure tensor functions shared by every method: scores and grid geometry in, kept tokens out.

Nothing here imports a model. Conventions used throughout:

* ``S`` tokens per side of one view (``image_size // patch_size``), ``N = S * S`` tokens per view;
* ``grid = (nph, npw)``: crops per column and per row of the AnyRes grid, ``n = nph * npw`` crops;
* crop tensors are ``(n, N)`` with crops in row-major order and tokens row-major inside a crop,
  exactly the order of the views produced by the LLaVA-NeXT processor;
* "grid space" is the same data laid out as one big ``(nph * S, npw * S)`` map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------
# [CLS] attention
# --------------------------------------------------------------------------------------------


def cls_attention(q_cls: torch.Tensor, keys: torch.Tensor, num_heads: int, score: str = "logits") -> torch.Tensor:
    """Head-averaged attention of the [CLS] query over the patch tokens.

    q_cls: (V, D) query of the [CLS] token, already multiplied by the head scale.
    keys:  (V, 1 + N, D) keys of [CLS] + patches.
    score: "logits" -> mean over heads of the pre-softmax logits (the authors' code);
           "softmax" -> mean over heads of the attention probabilities (paper Eq. 1).
    returns: (V, N) float32, one score per patch token.
    """
    v, t, d = keys.shape
    hd = d // num_heads
    q = q_cls.float().view(v, num_heads, 1, hd)  # (V, H, 1, hd)
    k = keys.float().view(v, t, num_heads, hd).transpose(1, 2)  # (V, H, 1+N, hd)
    logits = torch.matmul(q, k.transpose(-1, -2)).squeeze(2)  # (V, H, 1+N)
    if score == "softmax":
        logits = logits.softmax(dim=-1)
    return logits.mean(dim=1)[:, 1:]  # (V, N)


# --------------------------------------------------------------------------------------------
# Grid geometry
# --------------------------------------------------------------------------------------------


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


def softmax_retention(region_scores: torch.Tensor, ratio: float, temperature: float) -> torch.Tensor:
    """Per-crop retention ratios from crop scores (paper Eqs. 3-6).

    region_scores: (n,) float64. returns: (n,) float64 ratios r_j = min(R (1 + sigma_j - mean sigma), 1).
    """
    shifted = (region_scores - region_scores.max()) / temperature
    e = shifted.exp()
    sigma = e / (e.sum() + 1e-8)
    return (ratio * ((1 + sigma) - sigma.mean())).clamp(max=1.0)


def count_kept(n_tokens: torch.Tensor, ratio: torch.Tensor | float) -> torch.Tensor:
    """int(n * r) per entry, computed in float64 like Python's ``int(N * scale)``."""
    n = torch.as_tensor(n_tokens, dtype=torch.float64)
    r = torch.as_tensor(ratio, dtype=torch.float64, device=n.device)
    return (n * r).floor().long()


# --------------------------------------------------------------------------------------------
# Exact (content-independent) budgets
# --------------------------------------------------------------------------------------------


def exact_total(n_tokens: torch.Tensor | int, ratio: float) -> int:
    """round(R * sum N_j), halves rounded up, in float64: the crops' shared budget under ``budget="exact"``."""
    total = int(torch.as_tensor(n_tokens).sum())
    return min(math.floor(total * float(ratio) + 0.5), total)


def water_fill(weights: torch.Tensor, caps: torch.Tensor, total: float) -> torch.Tensor:
    """Real shares ``x_j = min(c_j, lam * w_j)`` with ``sum x_j = total``: proportional to the weights, capped.

    weights: (n,) w_j >= 0; negative, NaN or infinite weights count as 0. caps: (n,) c_j >= 0.
    total: 0 <= total <= sum caps. A weight-0 entry gets nothing until every weighted entry is full;
    the rest then goes to the weight-0 entries in proportion to their caps.
    returns: (n,) float64. Vectorised: one sort, no loop.
    """
    c = caps.double()
    if total > float(c.sum()) or total < 0:
        raise ValueError(f"total must be in [0, sum of caps = {float(c.sum())}], got {total}")
    w = weights.double()
    pos = torch.isfinite(w) & (w > 0) & (c > 0)  # (n,) entries that take a proportional share
    w = torch.where(pos, w, torch.zeros_like(w))
    full_pos = float(c[pos].sum())
    if total >= full_pos:  # every weighted entry full; the rest by caps among the others
        others = torch.where(pos, torch.zeros_like(c), c)
        rest = total - full_pos
        s = float(others.sum())
        return torch.where(pos, c, others * (rest / s) if s > 0 else torch.zeros_like(c))
    # An entry is full once lam reaches its level c_j / w_j. Sort by level; if the first k are full,
    # lam_k = (total - sum_{i<k} c_i) / sum_{i>=k} w_i, and the answer is the first k whose own level
    # is not below lam_k.
    level = torch.where(pos, c / torch.where(pos, w, torch.ones_like(w)), torch.full_like(c, math.inf))  # (n,)
    order = torch.argsort(level, stable=True)
    lv, cs, ws = level[order], torch.where(pos, c, 0.0)[order], w[order]  # (n,) each, sorted
    before = torch.cumsum(cs, 0) - cs  # (n,) caps of the entries sorted before
    after = torch.flip(torch.cumsum(torch.flip(ws, [0]), 0), [0])  # (n,) weights from here on
    lam = (total - before) / after.clamp(min=torch.finfo(torch.float64).tiny)  # (n,)
    ok = (lam <= lv) & (after > 0)
    k = int(torch.nonzero(ok)[0, 0])  # exists because total < sum of weighted caps
    return torch.minimum(c, lam[k] * w)


def largest_remainder(shares: torch.Tensor, caps: torch.Tensor, total: int, weights: torch.Tensor) -> torch.Tensor:
    """Integers summing to ``total`` from real shares: floors, then +1 by largest fractional part.

    shares: (n,) real shares summing to ``total``; caps: (n,) no entry exceeds its cap.
    Ties go to the larger weight, then to the lower index (deterministic).
    returns: (n,) long.
    """
    caps = caps.long()
    if total > int(caps.sum()) or total < 0:
        raise ValueError(f"total must be in [0, sum of caps = {int(caps.sum())}], got {total}")
    floor = shares.double().floor()
    base = torch.minimum(floor.long().clamp(min=0), caps)  # (n,)
    frac = (shares.double() - floor).nan_to_num(0.0)
    w = weights.double().nan_to_num(0.0, posinf=0.0, neginf=0.0)
    # priority: fractional part desc, then weight desc, then index asc (stable sorts, last key first)
    prio = torch.argsort(w, descending=True, stable=True)
    prio = prio[torch.argsort(frac[prio], descending=True, stable=True)]  # (n,)
    left = total - int(base.sum())
    while left > 0:  # one round in exact arithmetic; more only if rounding error left a crop short
        open_ = prio[base[prio] < caps[prio]][:left]
        base[open_] += 1
        left -= open_.numel()
    while left < 0:  # never in exact arithmetic; take back from the lowest priority
        give = prio.flip(0)[base[prio.flip(0)] > 0][:-left]
        base[give] -= 1
        left += give.numel()
    return base


def allocate_exact(weights: torch.Tensor, caps: torch.Tensor, total: int) -> torch.Tensor:
    """Split ``total`` tokens over crops in proportion to ``weights``, crop j capped at ``caps[j]``.

    Water-filling, then integers by largest remainder (see ``water_fill``, ``largest_remainder``).
    weights: (n,) e.g. N_j * r_j; caps: (n,) N_j. returns: (n,) long summing to ``total``.
    """
    caps = torch.as_tensor(caps).cpu()
    weights = torch.as_tensor(weights).cpu()
    return largest_remainder(water_fill(weights, caps, float(total)), caps, int(total), weights)


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


# --------------------------------------------------------------------------------------------
# Selection primitives
# --------------------------------------------------------------------------------------------


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, highest first. scores: (N,) -> (k,) long."""
    return torch.argsort(scores, descending=True)[:k]


def normalized_masked(x: torch.Tensor, valid: torch.Tensor) -> list[torch.Tensor]:
    """L2-normalise each row over its valid entries. x, valid: (n, N) -> list of (N_j,) tensors."""
    return [F.normalize(row[m].unsqueeze(0), p=2, dim=-1).squeeze(0) for row, m in zip(x, valid)]


def keep_top_per_row(scores: list[torch.Tensor], valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep mask from a top-k inside each crop, over the crop's valid tokens only.

    scores: n tensors (N_j,) aligned with the True entries of ``valid[j]``; valid: (n, N) bool;
    k: (n,) long. returns: (n, N) bool. Loops over crops, never over tokens.
    """
    keep = torch.zeros_like(valid)
    for j, (s, m, kj) in enumerate(zip(scores, valid, k.tolist())):
        pos = m.nonzero().squeeze(1)
        keep[j, pos[torch.topk(s, kj).indices]] = True
    return keep


# --------------------------------------------------------------------------------------------
# Assembly: which feature goes where in the language model's input
# --------------------------------------------------------------------------------------------


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
