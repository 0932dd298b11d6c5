"""``GlobalCom2LlavaNextForConditionalGeneration``: vLLM's LLaVA-NeXT with compressed visual tokens.

Two overrides make vLLM serve a compressed model with no change to vLLM itself:

* the processing info returns ``globalcom2.num_image_tokens`` for each image size, so vLLM expands
  ``<image>`` into exactly K placeholders and sizes the KV cache for K;
* the image embedding runs the vision tower, recomputes the [CLS] attention row of the score layer
  the way the HF path does (``globalcom2.models.llava_next._cls_scores``), selects with the very same
  code (``select_image`` -> the method registry) and returns those K features per image.

vLLM builds the CLIP tower only up to ``vision_feature_layer`` and drops the later layers' weights.
GlobalCom² scores tokens with the *last* layer's [CLS] attention, so the loader keeps that layer's
``layer_norm1``, ``q_proj`` and ``k_proj`` in a small replicated module (``globalcom2_score``).
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from collections.abc import Iterable
from types import SimpleNamespace

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...budget import num_image_tokens
from ...models import llava_next as adapter
from .options import method_config
from .select import image_tokens

_SCORE_WEIGHT = re.compile(
    r"(?:^|\.)vision_tower\.vision_model\.encoder\.layers\.(\d+)\.(layer_norm1|self_attn\.q_proj|self_attn\.k_proj)"
    r"\.(weight|bias)$"
)


class GlobalCom2LlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """LLaVA-NeXT processing info whose per-image token count is the compressed one."""

    #: image sizes whose count one processor remembers (least recently used dropped first)
    COUNT_CACHE_SIZE = 4096

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """K visual tokens for an image of this size under the configured method (``num_image_tokens``).

        vLLM asks once per image of every request, on the request's path to its first token. Parsing the
        options and counting cost milliseconds each (stock's count costs ~0.1 ms), so the parsed config is
        kept while the model config and its options are unchanged, and counts are remembered per size.
        """
        hf_config = self.get_hf_config()
        options = getattr(hf_config, "globalcom2", None)
        cache = self.__dict__.get("_globalcom2_cache")
        if cache is None or cache[0] is not hf_config or cache[1] != options:
            cache = (hf_config, copy.deepcopy(options), method_config(hf_config), OrderedDict())
            self._globalcom2_cache = cache
        counts, size = cache[3], (int(image_height), int(image_width))
        k = counts.get(size)
        if k is None:
            k = counts[size] = num_image_tokens(hf_config, size, cache[2])
            if len(counts) > self.COUNT_CACHE_SIZE:
                counts.popitem(last=False)
        else:
            counts.move_to_end(size)
        return k


class _ScoreAttention(nn.Module):
    """The q/k projections of one CLIP attention layer (enough for its [CLS] row)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.scale = (hidden // heads) ** -0.5
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)


class _ScoreLayer(nn.Module):
    """``layer_norm1`` and ``self_attn.{q,k}_proj`` of the CLIP layer whose [CLS] attention ranks tokens."""

    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = _ScoreAttention(hidden, heads)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor,
    info=GlobalCom2LlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class GlobalCom2LlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM LLaVA-NeXT that feeds its language model the visual tokens a globalcom2 method keeps."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        self.globalcom2_config = method_config(config)  # bad settings stop the engine here, before any weight
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(f"the vLLM plugin needs one int vision_feature_layer, got {config.vision_feature_layer!r}")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        vc = config.vision_config
        n_layers = vc.num_hidden_layers
        feature_pos = config.vision_feature_layer % (n_layers + 1)  # index into (embeddings, layer 1..L) outputs
        layer, self._score_kind = self.globalcom2_config.score_source
        layer = config.vision_feature_layer if layer is None else layer
        score_hs = layer % (n_layers + 1)  # as the HF path reads it: index into (embeddings, layer 1..L) outputs
        if score_hs == 0:
            raise ValueError(
                f"vision_feature_layer {layer} selects the embeddings, which no encoder layer's [CLS] attention "
                f"produced; method {self.globalcom2_config.name!r} needs a layer index other than 0 or {-n_layers - 1}"
            )
        self._score_pos = score_hs - 1  # encoder layer whose [CLS] attention ranks the tokens
        if self._score_pos > feature_pos:
            raise ValueError(
                f"method {self.globalcom2_config.name!r} scores with vision layer {layer}, whose input is "
                f"computed after vision_feature_layer={config.vision_feature_layer}; the vLLM plugin needs the "
                "score layer's input among the layers vLLM builds"
            )
        self._feature_pos = feature_pos
        self._geometry = adapter.Geometry.from_config(config)
        self.globalcom2_score = _ScoreLayer(vc.hidden_size, vc.num_attention_heads, vc.layer_norm_eps)
        self._score_tower = SimpleNamespace(
            encoder=SimpleNamespace(
                layers=[self.globalcom2_score if i == self._score_pos else None for i in range(n_layers)]
            ),
            config=vc,
        )

    # -- vision side -------------------------------------------------------------------------

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(V, N, D_llm) projected patch features, (V, N) [CLS] scores (the HF path's ``encode_views``) and
        the tower's hidden states [embeddings, layer 1..L'], each (V, 1+N, D_v)."""
        vm = self.vision_tower.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixel_values))  # (V, 1+N, D_v)
        hs = vm.encoder(inputs_embeds=h, return_all_hidden_states=True)  # [embeddings, layer 1..L'] (V, 1+N, D_v)
        feats = self.multi_modal_projector(hs[self._feature_pos][:, 1:])  # (V, N, D_llm)
        scores = adapter._cls_scores(self._score_tower, hs, self._score_kind, self._score_pos + 1)  # (V, N)
        return feats, scores, hs

    def _process_image_input(self, image_input) -> torch.Tensor | list[torch.Tensor]:
        """Per image, the (K_i, D_llm) features the method keeps, K_i = ``num_image_tokens`` of its size."""
        if image_input["type"] == "image_embeds":
            return image_input["data"]
        pixel_values = image_input["pixel_values"]  # (B, V_max, C, H, W) or B x (V_i, C, H, W)
        if image_input.get("image_sizes") is None:
            raise ValueError("image_sizes are required: the token selection depends on each image's (height, width)")
        sizes = [tuple(int(x) for x in s) for s in torch.as_tensor(image_input["image_sizes"]).tolist()]
        geo, cfg = self._geometry, self.globalcom2_config
        n_views = [1 + geo.grid(s)[0] * geo.grid(s)[1] for s in sizes]
        views = torch.cat([pv[:v] for pv, v in zip(pixel_values, n_views)])  # (sum V_i, C, H, W)
        feats, scores, hs = self._encode(views)
        hidden = keys = None
        if "hidden" in cfg.needs:  # VisionZip: the feature layer's hidden states, [CLS] first
            hidden = list(hs[self._feature_pos].split(n_views))
        if "keys" in cfg.needs:  # VisionZip's merge metric: the score layer's head-averaged keys
            keys = list(adapter._layer_keys(self._score_tower, hs, self._score_pos).split(n_views))
        return image_tokens(
            cfg, geo, list(feats.split(n_views)), list(scores.split(n_views)), sizes, self.image_newline,
            self.multi_modal_projector, hidden, keys,
        )  # fmt: skip

    # -- weights -----------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loading, plus a copy of the score layer's layer_norm1 / q_proj / k_proj weights."""
        params = dict(self.globalcom2_score.named_parameters())
        seen: set[str] = set()

        def keep_score_layer(ws):
            for name, w in ws:
                m = _SCORE_WEIGHT.search(name)
                if m and int(m.group(1)) == self._score_pos:
                    key = f"{m.group(2)}.{m.group(3)}"
                    with torch.no_grad():
                        params[key].copy_(w.to(params[key].dtype))
                    seen.add(key)
                yield name, w

        loaded = super().load_weights(keep_score_layer(weights))
        missing = sorted(set(params) - seen)
        if missing:
            raise ValueError(
                f"the checkpoint lacks vision layer {self._score_pos}'s {', '.join(missing)}, which the [CLS] "
                "score needs (expected under vision_tower.vision_model.encoder.layers.*, the llava-hf layout)"
            )
        return loaded | {f"globalcom2_score.{k}" for k in params}
