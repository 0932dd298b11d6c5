"""``GlobalCom2LlavaOnevisionForConditionalGeneration``: vLLM's LLaVA-OneVision with compressed image tokens.

The LLaVA-NeXT plugin's shape: the processing info returns ``globalcom2.num_image_tokens`` per image size
(vLLM's OneVision replaces ``<image>`` by ``get_num_image_tokens`` placeholders), and ``embed_multimodal``
(vLLM's public hook) runs the SigLIP tower once, rates the tokens with the HF path's scorer and returns the
tokens the HF path's selection keeps. Videos are served as stock vLLM serves them (the HF path refuses
them; vLLM's own video placeholders and pooling are untouched).

SigLIP has no [CLS] token: ``scorer`` is "auto" (= "global_dissimilarity"), "global_dissimilarity" or
"attention_received"; the latter recomputes the scoring layer's attention from a replicated copy of its
``layer_norm1`` / ``q_proj`` / ``k_proj`` (vLLM shards the fused qkv under tensor parallelism).

Calls into the HF adapter (``globalcom2.models.llava_onevision``, imported as ``adapter``), the whole list:

* ``adapter.ADAPTER.resolve(cfg, config)``: the family's config mapping and refusals (visionzip, scorer="cls");
* ``adapter.Geometry.from_config(config)`` and its ``layout(size)`` / ``grid(size)`` / ``side``;
* ``adapter.select_image(cfg, features, scores, size, layout, side, **inputs)`` -> (record, views);
* ``models.base.emit(views, record.order, newline)``;
* ``models.towers.tower_scores(tower, hidden_states, scorer, score, layer, has_cls=False)`` (the scorers).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llava_onevision import (
    LlavaOnevisionDummyInputsBuilder,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionMultiModalProcessor,
    LlavaOnevisionProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ...core import scoring
from ...models import llava_onevision as adapter
from ...models import towers
from ...models.base import emit
from .options import cached_count, method_config
from .score_layer import ScoreLayer, ScoreWeights, score_positions, score_tower

ARCHITECTURE = "GlobalCom2LlavaOnevisionForConditionalGeneration"
#: the scorers computed here (SigLIP: no [CLS] token)
SCORERS = ("auto", "global_dissimilarity", "attention_received")


def onevision_config(hf_config):
    """The method config the served OneVision runs with (``method_config`` + the family's mapping)."""
    return adapter.ADAPTER.resolve(method_config(hf_config, SCORERS), hf_config)


class GlobalCom2LlavaOnevisionProcessingInfo(LlavaOnevisionProcessingInfo):
    """LLaVA-OneVision processing info whose per-image token count is the compressed one."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """K visual tokens for an image of this size under the configured method (``num_image_tokens``, cached)."""
        return cached_count(self, (image_height, image_width), onevision_config)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaOnevisionMultiModalProcessor,
    info=GlobalCom2LlavaOnevisionProcessingInfo,
    dummy_inputs=LlavaOnevisionDummyInputsBuilder,
)
class GlobalCom2LlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """vLLM LLaVA-OneVision that feeds its language model the image tokens a globalcom2 method keeps."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        self.globalcom2_config = cfg = onevision_config(config)  # bad settings stop the engine here
        adapter.check_config(config)
        unservable = sorted(set(cfg.needs) - {"features"})
        if unservable:
            raise ValueError(f"method {cfg.name!r} needs {', '.join(unservable)}, which the OneVision plugin omits")
        layer, self._score_kind = cfg.requires.score_layer, cfg.requires.score
        self._feature_pos, self._score_pos = score_positions(config, layer, cfg.name)
        self._scorer = scoring.resolve_scorer(cfg.requires.scorer, has_cls=False, tower=adapter.TOWER)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        vc = config.vision_config
        self._geometry = adapter.Geometry.from_config(config)
        self.globalcom2_score = ScoreLayer(vc.hidden_size, vc.num_attention_heads, vc.layer_norm_eps)
        self._score_tower = score_tower(self.globalcom2_score, vc)

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, N, D_llm) projected features and (V, N) float32 scores (the HF path's ``encode_views``)."""
        vm = self.vision_tower.vision_model
        hs = vm.encoder(inputs_embeds=vm.embeddings(pixel_values), return_all_hidden_states=True)  # (V, N, D_v) each
        feats = self.multi_modal_projector(hs[self._feature_pos])  # (V, N, D_llm), strategy "full"
        scores = towers.tower_scores(
            self._score_tower, hs, self._scorer, self._score_kind, self._score_pos + 1, has_cls=False
        )  # (V, N)
        return feats, scores

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        """Per image, the (K_i, D_llm) tokens the method keeps; videos (and precomputed embeddings) as stock."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return super().embed_multimodal(**kwargs)
        if kwargs.get("image_sizes") is None:
            raise ValueError("image_sizes are required: the token selection depends on each image's (height, width)")
        sizes = [tuple(int(x) for x in s) for s in torch.as_tensor(kwargs["image_sizes"]).tolist()]
        geo, cfg = self._geometry, self.globalcom2_config
        n_views = [1 + geo.grid(s)[0] * geo.grid(s)[1] for s in sizes]
        views = torch.cat([pv[:v] for pv, v in zip(pixel_values, n_views)])  # (sum V_i, C, H, W)
        feats, scores = self._encode(views)
        out = []
        for f, s, size in zip(feats.split(n_views), scores.split(n_views), sizes):
            inputs = {"newline": self.image_newline.to(f.dtype)} if "features" in cfg.needs else {}
            rec, virtual = adapter.select_image(cfg, f, s, size, geo.layout(size), geo.side, **inputs)  # index 0
            out.append(emit(virtual, rec.order, self.image_newline))
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loading, plus a copy of the score layer's layer_norm1 / q_proj / k_proj weights."""
        copy = ScoreWeights(self.globalcom2_score, self._score_pos)
        loaded = super().load_weights(copy.keep(weights))
        return loaded | copy.check()
