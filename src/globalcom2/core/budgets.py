"""Token budgets: crop retention ratios (paper Eqs. 3-6) and exact, content-independent splits."""

from __future__ import annotations

import math

import torch


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


def hold_views(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Per-view counts lowered to one ceiling so that they sum to at most ``total``: ``min(k_v, c)`` with the largest
    c that fits (unchanged when they already fit). Views that keep equal counts keep equal counts.

    counts: (V,) long, tokens each view keeps; total: the most tokens the views may keep together.
    returns: (V,) long.
    """
    k = torch.as_tensor(counts).long().cpu()
    if int(k.sum()) <= total or k.numel() == 0:
        return k
    levels = torch.arange(int(k.max()) + 1)  # (K + 1,) candidate ceilings
    fits = torch.minimum(k[None, :], levels[:, None]).sum(1) <= max(int(total), 0)  # (K + 1,) monotone
    ceiling = int(levels[fits].max())
    return torch.minimum(k, torch.tensor(ceiling))
