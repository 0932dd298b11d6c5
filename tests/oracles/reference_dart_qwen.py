"""An oracle of DART's token choice on Qwen2.5-VL: ``get_retained_image_token`` of their Qwen2.5-VL code
(xqy1111111/DART at 5a19452f, ``Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py``, Zichen Wen's
"apply DART on Qwen2_5-VL").

Read against their LLaVA code (``reference_dart.reference_llm_keep``), the Qwen2.5-VL function is the same
algorithm (4 image pivots and 4 pivots of the tokens after the image span by the L1 norm of layer K-1's rotary
keys, visited in Python-set order, each keeping the TOPK free image tokens least cosine-similar to it in the
normed layer-K input, text pivots dropped at the end) with its own count, ``TOKEN_TOPK = int(image_token_length
* (1 - reduction_ratio) / (pivot_image_token + pivot_text_token))``, and the image span running from the first
``<|image_pad|>`` to ``<|vision_end|>``. So the oracle is that function with their Qwen count.
"""

from __future__ import annotations

from oracles.reference_dart import reference_llm_keep


def reference_qwen_keep(any_states, last_layer_state, start, length, reduction_ratio, n_img=4, n_txt=4):
    """Their retained image positions (sorted) for one prompt: ``any_states`` (L, H * hd) rotary keys of layer
    K-1, ``last_layer_state`` (L, D) the normed layer-K input, the image span ``start .. start + length - 1``."""
    token_topk = int(length * (1 - reduction_ratio) / (n_img + n_txt))
    return reference_llm_keep(any_states, last_layer_state, start, length, length, n_img, n_txt, topk=token_topk)
