"""A slow oracle of DART's token choice (``get_retained_image_token`` of ZichenWen1/DART, read from
its mirror xqy1111111/DART), moved to the language model's input as ``methods/dart.py`` documents:
L1 norms and cosines of input embeddings instead of layer-2 keys and hidden states, pivots
visited image pivots first. Kept naive: Python sets and lists, one cosine at a time.

Input: the image's stock visual tokens (T, D), the text embeddings (M, D), R. Output: kept rows.
"""

from __future__ import annotations

import torch.nn.functional as F


def reference_keep(tokens, text, ratio, n_img=4, n_txt=4):
    t = tokens.shape[0]
    retain = int(round(ratio * t))
    img_norm = [float(tokens[i].abs().sum()) for i in range(t)]
    image_pivots = sorted(range(t), key=lambda i: -img_norm[i])[:n_img]
    txt_norm = [float(text[i].abs().sum()) for i in range(text.shape[0])]
    text_pivots = sorted(range(text.shape[0]), key=lambda i: -txt_norm[i])[:n_txt]
    topk = min(retain, t - n_img) // (len(image_pivots) + len(text_pivots))
    kept = set(image_pivots)
    valid = [i for i in range(t) if i not in kept]
    pivots = [tokens[i] for i in image_pivots] + [text[i] for i in text_pivots]
    for vec in pivots:
        sims = [-float(F.cosine_similarity(vec, tokens[j], dim=0)) for j in valid]
        best = sorted(range(len(valid)), key=lambda k: -sims[k])[:topk]
        picked = [valid[k] for k in best]
        kept.update(picked)
        valid = [j for j in valid if j not in picked]
    return sorted(kept)


def reference_llm_keep(keys, states, start, length, retain, n_img=4, n_txt=4, topk=None):
    """DART's in-LLM choice, as ``get_retained_image_token`` runs it on one prompt (LLaVA-NeXT branch).

    keys: (L, H * hd) rotary-embedded keys of layer K-1 (their ``any_states`` after the reshape);
    states: (L, D) layer-K input after the final norm (their ``last_layer_state``); the image's tokens
    are positions ``start .. start + length - 1`` and the text after it runs to the end; retain: their
    ``retain_token_num_for_llava_next``; topk: their TOPK where a code path counts it otherwise (their
    Qwen2.5-VL code, ``reference_dart_qwen``). Returns the retained image positions, sorted (the order they
    come in does not matter: the caller concatenates and sorts). Naive on purpose: Python sets and lists.
    """
    if topk is None:
        topk = int(min(retain, length - n_img) // (n_img + n_txt))
    k_img = keys[start : start + length]
    k_txt = keys[start + length :]
    img_norm = [float(k_img[i].abs().sum()) for i in range(length)]
    txt_norm = [float(k_txt[i].abs().sum()) for i in range(k_txt.shape[0])]
    image_indices = [i + start for i in sorted(range(length), key=lambda i: -img_norm[i])[:n_img]]
    query_indices = [i + start + length for i in sorted(range(k_txt.shape[0]), key=lambda i: -txt_norm[i])[:n_txt]]
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length)) - set(image_indices)
    valid_list = sorted(valid_indices)
    for item in list(indices_set):
        sims = [-float(F.cosine_similarity(states[item], states[j], dim=0)) for j in valid_list]
        best = sorted(range(len(valid_list)), key=lambda k: -sims[k])[:topk]
        picked = [valid_list[k] for k in best]
        indices_set.update(picked)
        valid_indices.difference_update(picked)
        valid_list = sorted(valid_indices)
    indices_set.difference_update(query_indices)
    return sorted(indices_set)
