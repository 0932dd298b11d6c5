"""An oracle of DivPrune on Qwen2.5-VL as the community port the DivPrune authors link does it (Ironieser/MMTok
at d1522cda, ``mmtok/qwen/modeling_qwen2_5_vl_mmtok.py`` and ``qwen2_5_VLmodel_mmtok.py``), transcribed.

Features: the vision tower's hidden states after its last block (window order), the mean of each group of
m^2 consecutive rows (the port hard-codes 4), put back in raster order with the merger's ``reverse_indices``.
Selection: their ``DivPrune`` (1 - cosine distances; first pick by the second-smallest distance of a column,
then greedy max-min), ``int(ratio * tokens)`` of them, in the order chosen.
"""

from __future__ import annotations

import torch


def port_features(model, pixel_values, image_grid_thw):
    """(T, D_vis) the port's ``image_features`` of every merged token of the call, raster order."""
    visual = model.model.visual
    seen = {}
    handle = visual.blocks[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("h", out))
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values, image_grid_thw)
    finally:
        handle.remove()
    hidden = seen["h"][0] if isinstance(seen["h"], tuple) else seen["h"]
    unit = visual.spatial_merge_size**2
    feats = hidden.reshape(hidden.shape[0] // unit, unit, -1).mean(dim=1)
    if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: undo the window order as the merger's output does
        try:
            from transformers.vision_utils import get_vision_window_index

            window_index, _ = get_vision_window_index(
                image_grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size
            )
        except ImportError:  # transformers 5.0: the tower's own method
            window_index, _ = visual.get_window_index(image_grid_thw)
        feats = feats[torch.argsort(window_index)]
    return feats


def port_divprune(visual_feature_vectors, target_vision_tokens):
    """Their ``DivPrune``: (k,) selected indices, in the order chosen (their ``s.sort()`` is not in place)."""
    norm_matrix = visual_feature_vectors / visual_feature_vectors.norm(dim=1, keepdim=True)
    cosine_matrix = 1.0 - torch.mm(norm_matrix, norm_matrix.t())
    s = torch.empty(target_vision_tokens, dtype=torch.long)
    selected_mask = torch.zeros(cosine_matrix.size(0), dtype=torch.bool)
    for i in range(target_vision_tokens):
        if i == 0:
            m2 = cosine_matrix
            scores = torch.topk(m2, 2, dim=0, largest=False).values[1, :]
        else:
            m2 = torch.index_select(cosine_matrix, 0, torch.index_select(s, 0, torch.arange(0, i)))
            scores = torch.min(m2, dim=0).values
        scores[selected_mask] = float("-inf")
        idx = torch.argmax(scores)
        s[i] = idx
        selected_mask[idx] = True
    return s


def port_count(ratio, n_tokens):
    """Their ``int(token_retain_ratio * image_embeds.shape[0])``."""
    return int(ratio * n_tokens)
