"""A slow oracle of what the authors' released CDPruner code keeps on LLaVA-NeXT.

Written from the behaviour of Theia-4869/CDPruner (``llava/model/llava_arch.py``: the kernel and
greedy MAP of ``encode_images``; the layout of ``prepare_inputs_labels_for_multimodal``), kept naive:
the greedy MAP is done the slow way, by trying every candidate and taking the one whose kernel
submatrix has the largest determinant (float64), and the layout by loops over rows.

``prepare_inputs_labels_for_multimodal`` runs ``mm_patch_merge_type.replace('_unpad', '')``, so what
executes on LLaVA-NeXT is the plain ``spatial`` branch (``reference_tokens``): the thumbnail's T picks,
then every crop's T picks in raster order of the whole padded grid (``permute(0, 2, 1, 3)``), no
unpadding, no newlines. ``reference_tokens_unpad`` is the ``spatial_unpad`` branch that line switches
off (the mask unpadded with their truncating ``unpad_image``, a newline after every unpadded row).

Input: projected features (V, N, D), one text embedding per text token (M, D), the crop grid,
tokens per view T (and for the unpad branch the image size (height, width) and the newline
embedding). Output: (T', D).
"""

from __future__ import annotations

import torch


def reference_kernel(feats, text):
    x = feats.double() / feats.double().norm(dim=-1, keepdim=True)
    sim = x @ x.transpose(1, 2)
    t = text.double().mean(0)
    rel = -(x @ (t / t.norm()))  # (V, N): one pooled instruction vector
    rel = (rel - rel.min() + 1e-6) / (rel.max() - rel.min())
    return rel[:, :, None] * sim * rel[:, None, :]


def greedy_map(kernel, t):
    chosen = []
    n = kernel.shape[0]
    for _ in range(t):
        best, best_det = None, None
        for c in range(n):
            if c in chosen:
                continue
            idx = chosen + [c]
            det = float(torch.det(kernel[idx][:, idx]))
            if best_det is None or det > best_det:
                best, best_det = c, det
        chosen.append(best)
    return sorted(chosen)


def _picks(feats, text, t):
    """Every view's T picks (ascending) by the slow greedy, and S tokens per side."""
    kernel = reference_kernel(feats, text)
    return [greedy_map(kernel[i], t) for i in range(feats.shape[0])], int(feats.shape[1] ** 0.5)


def _kept_in_row(feats, keep, side, npw, row, cols):
    """The kept crop tokens of one row of the whole padded grid, left to right over ``cols``."""
    out = []
    for col in cols:
        crop = (row // side) * npw + col // side
        pos = (row % side) * side + col % side
        if pos in keep[1 + crop]:
            out.append(feats[1 + crop][pos])
    return out


def reference_tokens(feats, text, grid, t):
    """The branch their code executes: thumbnail picks, then the crops' picks across the padded grid."""
    keep, side = _picks(feats, text, t)
    out = [feats[0][p] for p in keep[0]]
    nph, npw = grid
    for row in range(nph * side):  # image_feature.permute(0, 2, 1, 3).flatten(0, 3): rows across the crops
        out += _kept_in_row(feats, keep, side, npw, row, range(npw * side))
    return torch.stack(out)


def reference_tokens_unpad(feats, text, grid, image_hw, t, newline):
    """The ``spatial_unpad`` branch their ``replace('_unpad', '')`` switches off."""
    keep, side = _picks(feats, text, t)
    out = [feats[0][p] for p in keep[0]]
    nph, npw = grid
    H, W = image_hw
    ch, cw = nph * side, npw * side
    top, bottom, left, right = 0, ch, 0, cw
    if W / H > cw / ch:
        pad = (ch - int(H * (cw / W))) // 2
        top, bottom = pad, ch - pad
    else:
        pad = (cw - int(W * (ch / H))) // 2
        left, right = pad, cw - pad
    for row in range(top, bottom):
        out += _kept_in_row(feats, keep, side, npw, row, range(left, right))
        out.append(newline)
    return torch.stack(out)
