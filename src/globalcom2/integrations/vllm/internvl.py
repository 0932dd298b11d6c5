"""``GlobalCom2InternVLForConditionalGeneration``: vLLM's HF-native InternVL with compressed image tokens.

vLLM serves ``InternVLForConditionalGeneration`` checkpoints (the transformers port: ``OpenGVLab/InternVL3-*-hf``)
with ``InternS1ForConditionalGeneration`` (``model_executor/models/interns1.py``). Its prompt replacement
writes ``<img>`` + ``<IMG_CONTEXT>`` x (tiles x ``image_seq_length``) + ``</img>`` per image and embeds only
the ``<IMG_CONTEXT>`` tokens; this plugin writes ``globalcom2.num_image_tokens`` of them instead, and its
``embed_multimodal`` (vLLM's public hook) runs InternViT once, rates the tokens as the HF path does and returns
the tokens the HF path's selection keeps. InternViT's q/k projections are plain replicated ``nn.Linear`` in
vLLM (only the MLP is tensor-parallel), so the scores are recomputed from the loaded layer itself; all
scorers run ("cls" by default).

The crop grid: the model gets no image size in vLLM (only ``image_num_patches``, which cannot tell 2 x 3
from 3 x 2), so the processor adds ``image_sizes`` (height, width) per image to the model inputs, and the
grid is the library's (``Geometry.grid``: GotOcr2's rule with its defaults ``min_patches=1, max_patches=12``;
a checkpoint whose processor tiles otherwise is refused at engine start). Videos are served as stock.

Calls into the HF adapter (``globalcom2.models.internvl``, imported as ``adapter``), the whole list:

* ``adapter.Geometry.from_config(config)`` (``grid``, ``views``, ``side``), ``adapter.MIN_PATCHES`` / ``MAX_PATCHES``;
* ``adapter.ADAPTER.resolve(cfg, config)`` (refusals, and the layout InternVL runs with);
* ``adapter.patch_scores(model, hidden_states, scorer, score, layer)`` and ``adapter.shuffle_groups(model, geo)``
  (they read ``model.model.vision_tower.encoder.layer[i]`` and ``model.model.pixel_shuffle``: a stand-in
  over vLLM's modules is passed);
* ``adapter.select_image(cfg, features, scores, grid)`` and ``models.base.emit`` (the body of
  ``adapter.compress``'s per-image loop, which reads the HF model's ``get_image_features``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdateDetails

from ...core import scoring
from ...models import internvl as adapter
from ...models.base import emit
from .options import cached_count, method_config

ARCHITECTURE = "GlobalCom2InternVLForConditionalGeneration"
SCORERS = ("auto", *scoring.SCORERS)


def internvl_config(hf_config):
    """The method config the served InternVL runs with."""
    return method_config(hf_config, SCORERS)


def check_tiling(image_processor, config) -> None:
    """ValueError unless the processor tiles images as the library counts them (GotOcr2 defaults)."""
    size = image_processor.size
    tile = int(size["height"] if isinstance(size, dict) else size.height)
    got = (bool(getattr(image_processor, "crop_to_patches", False)), int(image_processor.min_patches),
           int(image_processor.max_patches), tile)  # fmt: skip
    want = (True, adapter.MIN_PATCHES, adapter.MAX_PATCHES, adapter.Geometry.from_config(config).tile)
    if got != want:
        raise ValueError(
            f"the InternVL vLLM plugin counts tokens with the processor's default tiling (crop_to_patches, "
            f"min_patches, max_patches, tile) = {want}; this checkpoint's processor has {got}"
        )


class GlobalCom2InternVLProcessingInfo(InternS1ProcessingInfo):
    """InternVL processing info whose per-image token count is the compressed one."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int, processor, mm_kwargs=None) -> int:
        """K ``<IMG_CONTEXT>`` tokens for an image of this size under the configured method."""
        check_tiling(processor.image_processor, self.get_hf_config())
        return cached_count(self, (image_height, image_width), internvl_config)


class GlobalCom2InternVLMultiModalProcessor(InternS1MultiModalProcessor):
    """vLLM's processor, with K ``<IMG_CONTEXT>`` per image and each image's (height, width) for the model."""

    def _apply_hf_processor_main(self, mm_items, hf_kwargs) -> BatchFeature:
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        if "image_num_patches" in out and mm_items.get_count("image", strict=False):
            images = mm_items.get_items("image", ImageProcessorItems)
            sizes = [images.get_image_size(i) for i in range(images.get_count())]
            out["image_sizes"] = torch.tensor([[s.height, s.width] for s in sizes])
        return out

    def _get_mm_fields_config(self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields["image_sizes"] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence:
        updates = [u for u in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)]
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        tokenizer = self.info.get_tokenizer()
        ctx_id = hf_processor.image_token_id
        start = tokenizer.convert_tokens_to_ids(hf_processor.start_image_token)
        end = tokenizer.convert_tokens_to_ids(hf_processor.end_image_token)

        def image_replacement(item_idx: int):
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):
                k = images.get_feature_size(item_idx)
            else:
                size = images.get_image_size(item_idx)
                k = self.info.get_num_image_tokens(
                    image_width=size.width, image_height=size.height, processor=hf_processor
                )
            return PromptUpdateDetails.select_token_id([start] + [ctx_id] * k + [end], ctx_id)

        for i, u in enumerate(updates):
            if u.modality == "image":
                updates[i] = PromptReplacement(modality="image", target=u.target, replacement=image_replacement)
        return updates


@MULTIMODAL_REGISTRY.register_processor(
    GlobalCom2InternVLMultiModalProcessor,
    info=GlobalCom2InternVLProcessingInfo,
    dummy_inputs=InternS1DummyInputsBuilder,
)
class GlobalCom2InternVLForConditionalGeneration(InternS1ForConditionalGeneration):
    """vLLM InternVL (HF-native) that feeds its language model the image tokens a globalcom2 method keeps."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        self.globalcom2_config = cfg = internvl_config(config)  # bad settings stop the engine here
        adapter.check_config(config)
        self.globalcom2_config = cfg = adapter.ADAPTER.resolve(cfg, config)  # refusals; the layout InternVL runs
        unservable = sorted(set(cfg.needs) - {"features"})
        if unservable:
            raise ValueError(f"method {cfg.name!r} needs {', '.join(unservable)}, which the InternVL plugin omits")
        n = config.vision_config.num_hidden_layers
        layer = config.vision_feature_layer
        if isinstance(layer, bool) or not isinstance(layer, int) or not -(n + 1) <= layer <= n:
            raise ValueError(f"vision_feature_layer must be an int in [{-(n + 1)}, {n}], got {layer!r}")
        score_layer, self._score_kind = cfg.requires.score_layer, cfg.requires.score
        self._score_layer = layer if score_layer is None else score_layer
        if self._score_layer % (n + 1) == 0:
            raise ValueError("the scoring layer must be an encoder layer; hidden state 0 is the embeddings")
        self._scorer = scoring.resolve_scorer(cfg.requires.scorer, True, "InternViT")
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._geometry = adapter.Geometry.from_config(config)
        self._run = cfg

    def _hf_view(self) -> SimpleNamespace:
        """What the adapter's scorers read of an HF InternVL, over vLLM's modules."""
        layers = []
        for lyr in self.vision_tower.encoder.layer:
            a = lyr.attention
            norms = {n: getattr(a, n, nn.Identity()) for n in ("q_norm", "k_norm")}  # absent without qk norm
            attn = SimpleNamespace(q_proj=a.q_proj, k_proj=a.k_proj, scale=a.scale, num_heads=a.num_heads, **norms)
            layers.append(SimpleNamespace(layernorm_before=lyr.layernorm_before, attention=attn))
        tower = SimpleNamespace(encoder=SimpleNamespace(layer=layers))
        return SimpleNamespace(model=SimpleNamespace(vision_tower=tower, pixel_shuffle=self.pixel_shuffle))

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, N, D_llm) features as stock computes them and (V, N) float32 token scores (``adapter.encode``)."""
        vt = self.vision_tower
        h, _ = vt.embeddings(pixel_values)  # (V, 1+P^2, D_v)
        hs = [h]
        for lyr in vt.encoder.layer:
            h = lyr(h)
            hs.append(h)
        layer = self.config.vision_feature_layer
        x = vt.layernorm(hs[-1]) if layer == -1 else hs[layer]  # HF: last_hidden_state for -1, else hidden_states
        x = x[:, 1:]  # (V, P^2, D_v), strategy "default"
        side = int(x.shape[1] ** 0.5)
        x = self.pixel_shuffle(x.reshape(x.shape[0], side, side, -1), scale_factor=self.downsample_ratio)
        feats = self.multi_modal_projector(x.reshape(x.shape[0], -1, x.shape[-1]))  # (V, N, D_llm)
        view = self._hf_view()
        patches = adapter.patch_scores(view, hs, self._scorer, self._score_kind, self._score_layer)  # (V, P^2)
        groups = adapter.shuffle_groups(view, self._geometry, patches.device)  # (N, k^2)
        return feats, patches[:, groups].mean(dim=-1)

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        """Per image, the (K_i, D_llm) tokens the method keeps; videos (and precomputed embeddings) as stock."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return super().embed_multimodal(**kwargs)
        if kwargs.get("image_sizes") is None:
            raise ValueError("image_sizes are required: the token selection depends on each image's crop grid")
        if isinstance(pixel_values, (list, tuple)):
            pixel_values = torch.cat(list(pixel_values))
        sizes = [tuple(int(x) for x in s) for s in torch.as_tensor(kwargs["image_sizes"]).tolist()]
        geo, run = self._geometry, self._run
        grids = [geo.grid(s) for s in sizes]
        n_views = [adapter.Geometry.views(g) for g in grids]
        patches = torch.as_tensor(kwargs["image_num_patches"]).flatten().tolist()
        if patches != n_views:
            raise ValueError(f"tiles per image {patches} differ from the library's grids {grids} (views {n_views})")
        feats, scores = self._encode(pixel_values)
        out = []
        for f, s, g in zip(feats.split(n_views), scores.split(n_views), grids):
            rec = adapter.select_image(run, f, s, g)  # index 0: tokens never depend on the batch
            out.append(emit(f, rec.order))
        return out
