"""A slow, loop-by-loop oracle of what the authors' released GlobalCom² code emits.

Written independently from the description of xuyang-liu16/GlobalCom2 ``llava/model/llava_arch.py``
(``compress_thumbnail``, ``generate_scale_for_crop_features``, ``compress_crops``) and kept
deliberately naive: Python loops over tokens, numpy float64 for the crop ratios, one crop at a
time. The library's vectorised implementation must agree with it token for token.

Input: per-view features (V, N, D), per-view [CLS] scores (V, N), the crop grid, the image size
(height, width) and R. Output: the (T, D) features the language model receives.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def crop_scales(thumb: torch.Tensor, nph: int, npw: int, ratio: float, tau: float = 10.0) -> list[float]:
    n = thumb.shape[0]
    side = int(n**0.5)
    cell_w, cell_h = max(side // npw, 1), max(side // nph, 1)
    sums = np.zeros(nph * npw)
    for idx in range(n):
        i, j = divmod(idx, side)
        sums[min(i // cell_h, nph - 1) * npw + min(j // cell_w, npw - 1)] += float(thumb[idx])
    e = np.exp((sums - np.max(sums)) / tau)
    sm = e / (np.sum(e) + 1e-8)
    return np.clip(ratio * (1 + sm - np.mean(sm)), None, 1.0).tolist()


def reference_tokens(
    feats: torch.Tensor, scores: torch.Tensor, nph: int, npw: int, image_hw, ratio: float, newline: torch.Tensor
) -> torch.Tensor:
    side = int(feats.shape[1] ** 0.5)
    N = side * side
    # thumbnail: top int(N R) by score, best first
    thumb_scores = scores[0]
    order = torch.argsort(thumb_scores, descending=True)[: int(N * ratio)]
    thumb_out = feats[0][order]

    scales = crop_scales(thumb_scores, nph, npw, ratio)
    crops, crop_scores = feats[1:], scores[1:]
    H, W = image_hw
    ch, cw = nph * side, npw * side
    valid = torch.zeros(ch, cw, dtype=torch.bool)
    if W / H > cw / ch:
        new_h = int(H * (cw / W))
        pad = (ch - new_h) // 2
        valid[pad : ch - pad, :] = True
    else:
        new_w = int(W * (ch / H))
        pad = (cw - new_w) // 2
        valid[:, pad : cw - pad] = True
    rows = valid.any(1).nonzero().flatten()
    cols = valid.any(0).nonzero().flatten()
    box_h = int(rows[-1] - rows[0] + 1) if len(rows) else 0
    box_w = int(cols[-1] - cols[0] + 1) if len(cols) else 0

    # per-crop valid masks and their bounding boxes
    crop_valid, dims = [], []
    for i in range(nph):
        for j in range(npw):
            m = valid[i * side : (i + 1) * side, j * side : (j + 1) * side]
            crop_valid.append(m.reshape(-1))
            nz = m.nonzero()
            dims.append(
                (0, 0)
                if len(nz) == 0
                else (int(nz[:, 1].max() - nz[:, 1].min() + 1), int(nz[:, 0].max() - nz[:, 0].min() + 1))
            )

    if box_h and box_w:  # (the authors' code crashes on an image too thin to leave a single token)
        interp = F.interpolate(
            thumb_scores.view(1, 1, side, side), size=(box_h, box_w), mode="bilinear", align_corners=False
        )[0, 0]
    else:
        interp = torch.zeros(box_h, box_w)
    glob = []
    cur_h = 0
    for i in range(nph):
        cur_w = 0
        for j in range(npw):
            w, h = dims[i * npw + j]
            glob.append(interp[cur_h : cur_h + h, cur_w : cur_w + w].flatten())
            cur_w += w
        cur_h += dims[i * npw][1]

    slots = torch.zeros(nph * npw, N, dtype=torch.bool)
    slot_feat = torch.zeros(nph * npw, N, feats.shape[-1], dtype=feats.dtype)
    for c in range(nph * npw):
        m = crop_valid[c]
        tok = crops[c][m]
        loc = F.normalize(crop_scores[c][m].unsqueeze(0), p=2, dim=-1).squeeze(0)
        glo = F.normalize(glob[c].unsqueeze(0), p=2, dim=-1).squeeze(0)
        k = int(tok.shape[0] * scales[c])
        top = torch.topk(loc + glo, k).indices
        for slot_i in top.tolist():  # the authors write the kept token's unpadded index as its slot
            slots[c, slot_i] = True
            slot_feat[c, slot_i] = tok[slot_i]

    out = [thumb_out]
    for i in range(nph):
        for r in range(side):
            for j in range(npw):
                c = i * npw + j
                for col in range(side):
                    p = r * side + col
                    if slots[c, p]:
                        out.append(slot_feat[c, p][None])
            out.append(newline[None].to(feats.dtype))
    return torch.cat(out, dim=0)
