"""``GlobalCom2LlavaNextForConditionalGeneration``: vLLM's LLaVA-NeXT with compressed visual tokens.

Two overrides make vLLM serve a compressed model with no change to vLLM itself:

* the processing info returns ``globalcom2.num_image_tokens`` for each image size, so vLLM expands
  ``<image>`` into exactly K placeholders and sizes the KV cache for K;
* the image embedding (vLLM's public ``embed_multimodal`` hook) runs the vision tower, recomputes the
  [CLS] attention row of the score layer the way the HF path does
  (``globalcom2.models.llava_next._cls_scores``), selects with the very same code (``select_image`` ->
  the method registry) and returns those K features per image.

vLLM builds the CLIP tower only up to ``vision_feature_layer`` and drops the later layers' weights.
GlobalCom² scores tokens with the *last* layer's [CLS] attention, so the loader keeps that layer's
``layer_norm1``, ``q_proj`` and ``k_proj`` in a small replicated module (``globalcom2_score``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...core import scoring
from ...models import llava_next as adapter
from ...models import towers
from .options import cached_count, method_config
from .score_layer import ScoreLayer, ScoreWeights, score_positions, score_tower
from .select import image_tokens


class GlobalCom2LlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """LLaVA-NeXT processing info whose per-image token count is the compressed one."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """K visual tokens for an image of this size under the configured method (``num_image_tokens``, cached)."""
        return cached_count(self, (image_height, image_width), method_config)


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
        req = self.globalcom2_config.requires
        layer, self._score_kind = req.score_layer, req.score
        self._feature_pos, self._score_pos = score_positions(config, layer, self.globalcom2_config.name)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        vc = config.vision_config
        self._geometry = adapter.Geometry.from_config(config)
        self.globalcom2_score = ScoreLayer(vc.hidden_size, vc.num_attention_heads, vc.layer_norm_eps)
        self._score_tower = score_tower(self.globalcom2_score, vc)

    # -- vision side -------------------------------------------------------------------------

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(V, N, D_llm) projected patch features, (V, N) [CLS] scores (the HF path's ``encode_views``) and
        the tower's hidden states [embeddings, layer 1..L'], each (V, 1+N, D_v)."""
        vm = self.vision_tower.vision_model
        h = vm.pre_layrnorm(vm.embeddings(pixel_values))  # (V, 1+N, D_v)
        hs = vm.encoder(inputs_embeds=h, return_all_hidden_states=True)  # [embeddings, layer 1..L'] (V, 1+N, D_v)
        feats = self.multi_modal_projector(hs[self._feature_pos][:, 1:])  # (V, N, D_llm)
        score = self.globalcom2_score  # the score layer's replicated layer_norm1 / q_proj / k_proj
        attn = score.self_attn
        x = score.layer_norm1(hs[self._score_pos])  # (V, 1+N, D_v) the score layer's normed input
        scores = scoring.cls_scores_from_input(
            x, attn.q_proj, attn.k_proj, attn.num_heads, attn.scale, self._score_kind
        )
        return feats, scores, hs

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        """Per image, the (K_i, D_llm) features the method keeps, K_i = ``num_image_tokens`` of its size.

        vLLM's public multimodal hook (``SupportsMultiModal.embed_multimodal``): the runner calls it with
        one modality's batched kwargs, ``pixel_values`` (B, V_max, C, H, W) or B x (V_i, C, H, W) and
        ``image_sizes`` (B, 2). Precomputed ``image_embeds`` go to vLLM's model unchanged.
        """
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return super().embed_multimodal(**kwargs)
        if kwargs.get("image_sizes") is None:
            raise ValueError("image_sizes are required: the token selection depends on each image's (height, width)")
        sizes = [tuple(int(x) for x in s) for s in torch.as_tensor(kwargs["image_sizes"]).tolist()]
        geo, cfg = self._geometry, self.globalcom2_config
        n_views = [1 + geo.grid(s)[0] * geo.grid(s)[1] for s in sizes]
        views = torch.cat([pv[:v] for pv, v in zip(pixel_values, n_views)])  # (sum V_i, C, H, W)
        feats, scores, hs = self._encode(views)
        hidden = keys = None
        if "hidden" in cfg.needs:  # VisionZip: the feature layer's hidden states, [CLS] first
            hidden = list(hs[self._feature_pos].split(n_views))
        if "keys" in cfg.needs:  # VisionZip's merge metric: the score layer's head-averaged keys
            keys = list(towers.layer_keys(self._score_tower, hs, self._score_pos + 1).split(n_views))
        return image_tokens(
            cfg, geo, list(feats.split(n_views)), list(scores.split(n_views)), sizes, self.image_newline,
            self.multi_modal_projector, hidden, keys,
        )  # fmt: skip

    # -- weights -----------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loading, plus a copy of the score layer's layer_norm1 / q_proj / k_proj weights."""
        copy = ScoreWeights(self.globalcom2_score, self._score_pos)
        loaded = super().load_weights(copy.keep(weights))
        return loaded | copy.check()
