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
