"""Selection primitives: top-k inside views, normalised scores over valid tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
