"""What the vLLM model runs per image once the tower has run: the library's selection, no vLLM import.

Kept apart from ``llava_next.py`` (which imports vLLM) so the glue is tested without vLLM against the
Hugging Face path (``tests/test_vllm_glue.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...methods import MethodConfig
from ...models import llava_next as adapter
from ...models.base import emit

#: ``ImageContext`` inputs the vLLM model can give a method: an image's embedding is computed (and cached)
#: without its prompt, so the prompt's text ("text") is not among them ("tower": the tower's own vectors, which
#: only the Qwen-VL families define).
SERVABLE_NEEDS = frozenset({"features", "hidden", "keys", "tower"})


def image_tokens(
    cfg: MethodConfig,
    geo: adapter.Geometry,
    feats: list[torch.Tensor],
    scores: list[torch.Tensor],
    sizes: list[tuple[int, int]],
    newline: torch.Tensor,
    projector: Callable[[torch.Tensor], torch.Tensor],
    hidden: list[torch.Tensor] | None = None,
    keys: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Per image, the (K_i, D_llm) tokens ``cfg`` keeps, as ``adapter.compress`` + ``adapter.emit`` give them.

    feats: per image (V_i, N, D_llm) projected features; scores: per image (V_i, N) [CLS] scores;
    newline: (D_llm,); projector: the model's projector (for merged vision-space tokens);
    hidden, keys: per image (V_i, 1 + N, D_vis) feature-layer hidden states and (V_i, 1 + N, d_head)
    head-averaged keys of the score layer, needed only by methods that list them in ``needs``.
    """
    out = []
    for i, (f, s, size) in enumerate(zip(feats, scores, sizes)):
        inputs = {}
        if "features" in cfg.needs:
            inputs.update(features=f, newline=newline.to(f.dtype))
        if "hidden" in cfg.needs:
            inputs["hidden"] = hidden[i]
        if "keys" in cfg.needs:
            inputs["keys"] = keys[i]
        rec = adapter.select_image(cfg, s, size, geo, **inputs)  # index 0: tokens never depend on the batch
        extra = rec.selection.extra
        merged = projector(extra.to(f.dtype)).to(f.dtype) if extra is not None and extra.shape[0] else None
        out.append(emit(f, rec.order, newline, merged))  # (K_i, D_llm), as the HF path's compress emits it
    return out
