"""A slow oracle of what the authors' released VisionZip code emits for one LLaVA-NeXT image.

Written from the behaviour of dvlab-research/VisionZip (``visionzip/clip_encoder.py`` forward,
``llava_arch.py`` ``restore_image_features_sorted``), kept naive: Python loops over tokens.

Inputs: per view the [CLS] attention probabilities of every head (V, H, N), the feature layer's
hidden states (V, 1 + N, D) and the head-averaged keys of that layer (V, 1 + N, d); ``dominant``
and ``contextual`` as their ``visionzip(model, dominant, contextual)`` (dominant counts [CLS]);
the crop grid (nph, npw). Output: (T, D) vision-space tokens in the order the LLM receives them
(the projector is applied afterwards).
"""

from __future__ import annotations

import torch


def view_tokens(attn, hidden, metric, dominant, contextual):
    """(dominant [CLS first, patches in index order], contextual, kept patch indices) of one view."""
    n = attn.shape[-1]
    summed = attn.sum(0)  # heads summed, as their code
    top = sorted(summed.topk(dominant - 1).indices.tolist())
    dom = [hidden[0]] + [hidden[1 + i] for i in top]
    rest = [p for p in range(1, n + 1) if p - 1 not in top]
    m = len(rest)
    step = max(1, m // contextual)
    targets = list(range(0, m, step))[:contextual]
    normed = [metric[p] / metric[p].norm() for p in rest]
    groups = {t: [] for t in targets}
    for i in range(m):
        if i in targets:
            continue
        sims = [float(normed[i] @ normed[t]) for t in targets]
        best = targets[max(range(len(sims)), key=lambda j: (sims[j], -j))]  # first max
        groups[best].append(hidden[rest[i]])
    ctx = []
    for t in targets:
        agg = torch.stack(groups[t]).mean(0) if groups[t] else torch.zeros_like(hidden[0])
        ctx.append(hidden[rest[t]] + agg)
    return dom, ctx, top


def reference_tokens(attn, hidden, metric, dominant, contextual, grid):
    nph, npw = grid
    side = int(attn.shape[-1] ** 0.5)
    views = [view_tokens(attn[v], hidden[v], metric[v], dominant, contextual) for v in range(attn.shape[0])]
    dom0, ctx0, _ = views[0]
    out = list(dom0) + list(ctx0)
    # crops: kept patches at their place in the (nph * S, npw * S) grid, read in raster order
    for row in range(nph * side):
        for col in range(npw * side):
            crop = (row // side) * npw + col // side
            pos = (row % side) * side + col % side
            dom, _, top = views[1 + crop]
            if pos in top:
                out.append(dom[1 + top.index(pos)])
    out += [views[1 + j][0][0] for j in range(nph * npw)]  # crops' [CLS]
    for j in range(nph * npw):
        out += views[1 + j][1]
    return torch.stack(out)
