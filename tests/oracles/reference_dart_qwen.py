"""A slow oracle of DART's token choice on Qwen2.5-VL: ``get_retained_image_token`` of their Qwen2.5-VL code
(xqy1111111/DART at 5a19452f, ``Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py``, Zichen Wen's
"apply DART on Qwen2_5-VL"), transcribed with its Python sets and lists and one cosine per pivot.

Inputs as their code reads them for one prompt (batch 1): ``any_states`` (L, H * hd) the rotary-embedded keys
of layer K-1, ``last_layer_state`` (L, D) the input of layer K after the final norm, the image span
``start .. start + length - 1`` (first ``<|image_pad|>`` to ``<|vision_end|>``), ``reduction_ratio`` = 1 - R.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_qwen_keep(any_states, last_layer_state, start, length, reduction_ratio, n_img=4, n_txt=4):
    """Their retained image positions (sorted; the caller concatenates text and sorts)."""
    token_topk = int(length * (1 - reduction_ratio) / (n_img + n_txt))
    k_image = any_states[start : start + length, :]
    k_query = any_states[start + length :, :]
    image_l1 = torch.norm(k_image, p=1, dim=-1)
    query_l1 = torch.norm(k_query, p=1, dim=-1)
    image_indices = (image_l1.topk(n_img).indices + start).tolist()
    query_indices = (query_l1.topk(n_txt).indices + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length)) - set(image_indices)
    valid_indices_list = list(valid_indices)
    for item in list(indices_set):
        valid_vectors = last_layer_state[valid_indices_list, :]
        cos_sim = -F.cosine_similarity(last_layer_state[item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(token_topk).indices
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)
