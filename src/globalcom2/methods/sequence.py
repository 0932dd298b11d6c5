"""A family's stock visual sequence, for the methods that select over it (DivPrune, DART's embedding form)."""

from __future__ import annotations

import torch

from .. import core
from ..core.context import ImageContext, Selection


def stock_order(ctx: ImageContext) -> torch.Tensor:
    """(T,) long: the family's stock visual sequence of one image as indices into
    ``concat(views.flatten(0, 1), newline)`` (``ctx.stock_order`` where the family sets it, else
    LLaVA-NeXT's: thumbnail, unpadded crop rows each ending with the newline). Geometry only."""
    if ctx.stock_order is not None:
        return ctx.stock_order
    dev = ctx.valid.device
    thumb = torch.arange(ctx.scores.shape[1], device=dev)
    return core.assemble_order(thumb, ctx.valid, ctx.valid, ctx.grid, ctx.side, "spatial", ctx.box)


def stock_length(ctx: ImageContext) -> int:
    """T, the stock number of visual tokens of one image of ``ctx``'s geometry."""
    return int(stock_order(ctx).numel())


def stock_sequence(ctx: ImageContext, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock visual sequence of one image, for methods that select over it.

    returns: (order (T,) long indices into ``concat(views.flatten(0, 1), newline)`` in stock order,
        source (V N + 1, D) the detached projected features with the newline last).
    """
    if ctx.features is None or ctx.newline is None:
        raise ValueError(f"{method} needs the projected features (ImageContext.features/newline)")
    feats = ctx.features.detach()  # (V, N, D)
    with torch.no_grad():
        order = stock_order(ctx).to(feats.device)  # (T,)
        source = torch.cat([feats.flatten(0, 1), ctx.newline.detach()[None].to(feats.dtype)])  # (V N + 1, D)
    return order, source


def selection_from_order(order: torch.Tensor, ctx: ImageContext) -> Selection:
    """The ``Selection`` of a method that decides its emission ``order`` (T,) itself."""
    v, n_tok = ctx.scores.shape
    kept = torch.zeros(v * n_tok, dtype=torch.bool, device=order.device)
    kept[order[order < v * n_tok]] = True
    kept = kept.view(v, n_tok)  # (V, N)
    ratios = (kept[1:].sum(1).double() / ctx.valid.to(kept.device).sum(1).clamp(min=1).double()).cpu()
    return Selection(order[order < n_tok], kept[1:], ratios, order=order)
