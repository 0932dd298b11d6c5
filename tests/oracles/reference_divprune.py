"""A slow oracle of what the authors' released DivPrune code keeps on LLaVA-1.6.

Written from the behaviour of vbdi/divprune (``LLaVA/llava/model/llava_arch.py``: ``DivPrune``,
``pairwise_cosine_similarity`` and the selection after the stock multimodal packing), kept
naive: Python loops and plain min/max over lists.

Input: the image's stock visual tokens (T, D) as LLaVA-NeXT packs them (thumbnail, unpadded
crops, a newline per row) and the subset ratio. Output: the kept tokens in stock order.
"""

from __future__ import annotations

import torch


def reference_keep(tokens: torch.Tensor, ratio: float) -> list[int]:
    t = tokens.shape[0]
    k = int(round(ratio * t))
    x = tokens.float()
    normed = x / x.norm(dim=1, keepdim=True)
    dist = (1.0 - normed @ normed.t()).tolist()
    chosen: list[int] = []
    for i in range(k):
        if i == 0:  # distance of every token to its nearest other token (second smallest of the column)
            scores = [sorted(dist[r][c] for r in range(t))[1] for c in range(t)]
        else:
            scores = [min(dist[r][c] for r in chosen) for c in range(t)]
            for c in chosen:  # a token is kept once
                scores[c] = -float("inf")
        best = max(range(t), key=lambda c: (scores[c], -c))  # first maximum, like torch.argmax
        chosen.append(best)
    return sorted(chosen)


def reference_tokens(tokens: torch.Tensor, ratio: float) -> torch.Tensor:
    return tokens[reference_keep(tokens, ratio)]
