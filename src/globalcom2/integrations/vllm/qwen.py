"""``GlobalCom2Qwen2_5_VLForConditionalGeneration`` and ``GlobalCom2Qwen3VLForConditionalGeneration``: vLLM's
Qwen2.5-VL and Qwen3-VL with compressed image tokens, every kept token at its stock 3-D M-RoPE position.

What differs from stock vLLM, and why it is exact (``docs/vllm-notes.md`` §4 has vLLM's call chain):

* **counts** (``_get_prompt_updates``, ``get_num_image_tokens``): an image's ``<|image_pad|>`` run holds
  ``globalcom2.num_image_tokens`` placeholders for its merged grid (h', w') — a function of the resized size
  only (``budget="exact"`` where a method's count would read the pixels), fixed before the encoder runs.
* **embeddings** (``embed_multimodal``): vLLM's tower runs once, unchanged; hooks on its blocks read what the
  method needs (the scoring block's input, rated with a replicated copy of that block's ``norm1`` + fused
  ``qkv`` — vLLM shards ``qkv`` by heads under tensor parallelism —, its output, the last block's output, the
  DeepStack blocks' outputs), and the HF path's own selection (``QwenAdapter.select_pass``: one
  implementation) picks the K rows, in stock raster order. Qwen3-VL's rows carry their DeepStack columns
  (the tower returns them concatenated; vLLM splits them off in ``embed_input_ids``), so DeepStack is pruned
  with the main sequence. Each row gets 4 extra columns, its merged-grid row and column as
  ``[r // 128, r % 128, c // 128, c % 128]`` (integers below 128: exact in fp16 and bf16).
* **positions** (``get_mrope_input_positions``): stock's positions of the prompt with every image expanded
  back to its h' w' slots, then each image's K slots take the position of its first slot (t, h, w = b) and
  the text keeps stock's positions and delta; ``embed_input_ids`` strips the 4 columns into a per-token
  offset (0, r, c) and ``forward`` adds it to the positions of the image slots, so the language model sees
  every kept token at (b, b + r, b + c), exactly its stock position. Each row carries its own offset, so
  chunked prefill, prefix caching and the encoder cache need nothing more.

Refused at engine start with the library's error: pipeline parallelism (later stages never see the
offsets), vLLM's own multimodal pruning (``--video-pruning-rate``: its position columns would collide),
methods that read the prompt or prune inside the LLM. Videos are served as stock serves them. Precomputed
``image_embeds`` are refused per request (their kept positions are unknown).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import SimpleNamespace

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ...budget import num_image_tokens
from ...models import qwen2_5_vl, qwen3_vl
from ...models import qwen_common as qc
from .options import cached_count, method_config
from .qwen_offsets import OFFSET_COLUMNS, decode_offsets, encode_offsets, expanded_positions
from .qwen_score import QwenScoreBlock, QwenScoreWeights, capture_vllm_block_input, capture_vllm_block_output

#: the scorers computed here (no [CLS] token): "auto" is the family's attention_received
SCORERS = ("auto", "attention_received", "global_dissimilarity")
#: the image inputs of a call (the rest are videos')
IMAGE_KWARGS = ("pixel_values", "image_grid_thw", "image_embeds")


def _adapter(hf_config) -> qc.QwenAdapter:
    return qwen3_vl.ADAPTER if qc.is_qwen3(hf_config) else qwen2_5_vl.ADAPTER


def _factor(hf_config) -> int:
    vc = hf_config.vision_config
    return int(vc.patch_size) * int(vc.spatial_merge_size)


def exact_size(size: tuple[int, int]) -> dict:
    """Processor settings under which ``smart_resize`` leaves an already-resized (height, width) unchanged."""
    pixels = int(size[0]) * int(size[1])
    return {"min_pixels": pixels, "max_pixels": pixels}


def qwen_config(hf_config):
    """The method config the served Qwen-VL runs with (``method_config`` + the family's mapping)."""
    f = _factor(hf_config)
    probe_size = (16 * f, 32 * f)

    def probe(cfg):
        return num_image_tokens(hf_config, probe_size, cfg, processor=exact_size(probe_size))

    adapter = _adapter(hf_config)
    adapter.check_config(hf_config)
    return adapter.resolve(method_config(hf_config, SCORERS, probe=probe), hf_config)


def grid_count(info, merged: tuple[int, int]) -> int:
    """K placeholders for an image whose merged grid is ``merged`` = (h', w') (cached per size)."""
    f = _factor(info.get_hf_config())
    size = (int(merged[0]) * f, int(merged[1]) * f)
    return cached_count(info, size, qwen_config, processor=exact_size(size))


class _CountingInfo:
    """Processing-info mixin: the per-image count of a resized image is the compressed one."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int, image_processor, mm_kwargs) -> int:
        """K tokens for an image of this size as the processor resizes it."""
        resized, _ = self._get_vision_info(
            image_width=image_width, image_height=image_height, num_frames=1, image_processor=image_processor,
            mm_kwargs=mm_kwargs, modality="image",
        )  # fmt: skip
        f = _factor(self.get_hf_config())
        return grid_count(self, (resized.height // f, resized.width // f))


class _CountingProcessor:
    """Multimodal-processor mixin: each image's placeholder run holds its compressed count."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs) -> Sequence:
        updates = list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs))
        m = int(self.info.get_hf_config().vision_config.spatial_merge_size)
        for i, u in enumerate(updates):
            if u.modality != "image":
                continue
            stock = u.replacement

            def image_replacement(item_idx: int, stock=stock):
                _, h, w = (int(x) for x in out_mm_kwargs["image"][item_idx]["image_grid_thw"].data)
                return list(stock(item_idx))[: grid_count(self.info, (h // m, w // m))]

            updates[i] = PromptReplacement(modality="image", target=u.target, replacement=image_replacement)
        return updates


class GlobalCom2Qwen2_5_VLProcessingInfo(_CountingInfo, Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL processing info with compressed per-image counts."""


class GlobalCom2Qwen2_5_VLMultiModalProcessor(_CountingProcessor, Qwen2_5_VLMultiModalProcessor):
    """Qwen2.5-VL processor with K placeholders per image."""


class GlobalCom2Qwen3VLProcessingInfo(_CountingInfo, Qwen3VLProcessingInfo):
    """Qwen3-VL processing info with compressed per-image counts."""


class GlobalCom2Qwen3VLMultiModalProcessor(_CountingProcessor, Qwen3VLMultiModalProcessor):
    """Qwen3-VL processor with K placeholders per image."""


class _CompressedQwen:
    """Model mixin over vLLM's Qwen2.5-VL / Qwen3-VL (see the module docstring)."""

    def _globalcom2_init(self, vllm_config: VllmConfig) -> None:
        """Before stock's ``__init__``: parse the options (a bad setting stops the engine here) and refuse what
        the offsets cannot serve."""
        config = vllm_config.model_config.hf_config
        self.globalcom2_config = cfg = qwen_config(config)
        self._adapter = _adapter(config)
        pp = int(vllm_config.parallel_config.pipeline_parallel_size)
        if pp > 1:
            raise ValueError(
                f"pipeline_parallel_size={pp}: the globalcom2 plugin for {self._adapter.display_name} gives kept "
                "image tokens their positions on the first pipeline stage only; serve it with "
                "pipeline_parallel_size=1 (tensor parallelism and replicas are supported)"
            )
        if getattr(vllm_config.compilation_config, "compile_mm_encoder", False):
            raise ValueError(
                "compile_mm_encoder: the globalcom2 plugin reads the vision blocks' inputs and outputs as the tower "
                "runs, which a compiled encoder does not expose; serve with compile_mm_encoder off (vLLM's default)"
            )
        mm = vllm_config.model_config.get_multimodal_config()
        if mm is not None and mm.is_multimodal_pruning_enabled():
            raise ValueError(
                "video_pruning_rate: vLLM's own multimodal pruning appends its own position columns to every "
                "image embedding; the globalcom2 plugin cannot run beside it (unset --video-pruning-rate)"
            )
        vc = config.vision_config
        depth = int(getattr(vc, "depth", 0) or vc.num_hidden_layers)
        self._readout = qc.TowerReadout.of(
            depth, getattr(vc, "deepstack_visual_indexes", None), self._adapter.scorer(cfg), cfg.requires.score_layer,
            cfg.needs,
        )  # fmt: skip
        self._offsets: torch.Tensor | None = None

    def _globalcom2_modules(self) -> None:
        """After stock's ``__init__``: the replicated scoring block and the stand-in the mergers are read from."""
        config = self.config
        vc = config.vision_config
        self.globalcom2_score = QwenScoreBlock(
            int(vc.hidden_size), int(vc.num_heads), rms=not qc.is_qwen3(config), qwen3=qc.is_qwen3(config)
        )
        self._mergers = SimpleNamespace(config=config, model=SimpleNamespace(visual=self.visual))

    # -- the vision side -------------------------------------------------------------------------

    def _patch_order(self, meta: dict, grid: torch.Tensor) -> torch.Tensor:
        """Row r of the tower's patch sequence is processor patch ``order[r]`` (window order on Qwen2.5-VL)."""
        total = int(grid.prod(1).sum())
        window = meta.get("window_index")
        if window is None:
            return torch.arange(total)
        unit = int(self.visual.spatial_merge_size) ** 2
        return (window.long().cpu()[:, None] * unit + torch.arange(unit)).reshape(-1)

    def _tower(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> qc.TowerPass:
        """vLLM's tower once over the call's images, read as the HF path reads its own (``read_tower_pass``)."""
        grid_list = grid.tolist()
        meta = self.visual.prepare_encoder_metadata(grid_list)
        seen: dict = {}
        handles = qc.tower_hooks(self.visual.blocks, self._readout, seen, capture_vllm_block_input,
                                 capture_vllm_block_output)  # fmt: skip
        try:
            out = self.visual(pixel_values, grid_thw=grid_list, encoder_metadata=meta)  # (sum N, D (1 + L))
        finally:
            for h in reversed(handles):
                h.remove()
        m = int(self.visual.spatial_merge_size)
        counts = (grid.prod(1) // (m * m)).tolist()
        d = int(self.config.vision_config.out_hidden_size)
        parts = out.split(d, dim=-1)  # main, then one per DeepStack level
        feats = list(parts[0].split(counts))
        deep = [list(p.split(counts)) for p in parts[1:]] or None
        return qc.read_tower_pass(
            self._readout, seen, self.globalcom2_score, feats, deep, self._patch_order(meta, grid), m
        )

    def _compressed_images(self, pixel_values: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        """Per image (K_i, D (1 + L) + 4): the kept rows (DeepStack columns included) and their offsets."""
        tp = self._tower(pixel_values, grid)
        picked = self._adapter.select_pass(self._mergers, self.globalcom2_config, tp, grid)
        m = int(self.visual.spatial_merge_size)
        out = []
        for f, rec, g in zip(picked.features, picked.records, grid.tolist()):
            tok = rec.tokens
            rows = [f] + ([] if tok.deepstack is None else [d.to(f.dtype) for d in tok.deepstack])
            rows.append(encode_offsets(tok.index, g[2] // m).to(f.device, f.dtype))
            out.append(torch.cat(rows, dim=-1))
        return out

    def embed_multimodal(self, **kwargs: object):
        """Images: the compressed rows (``_compressed_images``); videos as stock."""
        if kwargs.get("image_embeds") is not None:
            raise ValueError(
                "image_embeds: the globalcom2 plugin selects image tokens from the tower's pass and gives each "
                "kept token its stock position; precomputed image embeddings carry neither (send the image)"
            )
        if kwargs.get("pixel_values") is None:
            return super().embed_multimodal(**kwargs)
        images = self._parse_and_validate_image_input(**kwargs)
        compressed = tuple(self._compressed_images(images["pixel_values"], images["image_grid_thw"].long().cpu()))
        if kwargs.get("pixel_values_videos") is None:
            return compressed
        videos = tuple(super().embed_multimodal(**{k: v for k, v in kwargs.items() if k not in IMAGE_KWARGS}) or ())
        images_first = next(k for k in kwargs if k in ("pixel_values", "pixel_values_videos")) == "pixel_values"
        return compressed + videos if images_first else videos + compressed  # stock's order: the kwargs'

    # -- the language-model side -----------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        """Stock's positions with every image at its full grid, then each image's K slots at its first slot's
        position (``forward`` adds each kept token's (0, r, c)); the text keeps stock's positions and delta."""
        m = int(self.config.vision_config.spatial_merge_size)
        image_token = int(self.config.image_token_id)
        return expanded_positions(super().get_mrope_input_positions, input_tokens, mm_features, m, image_token)

    def _stock_width(self) -> int:
        d = int(self.config.vision_config.out_hidden_size)
        return d * (1 + len(getattr(self.config.vision_config, "deepstack_visual_indexes", None) or ()))

    def embed_input_ids(self, input_ids: torch.Tensor, multimodal_embeddings=None, *, is_multimodal=None):
        """Strip the offset columns of compressed image rows into a per-token offset for ``forward``."""
        self._offsets = None
        if multimodal_embeddings is not None and len(multimodal_embeddings):
            width = self._stock_width()
            stripped, offsets = [], []
            for e in multimodal_embeddings:  # per item: compressed image rows carry OFFSET_COLUMNS more
                if e.shape[-1] == width + OFFSET_COLUMNS:
                    stripped.append(e[:, :width])
                    offsets.append(decode_offsets(e[:, width:]))
                else:
                    stripped.append(e)
                    offsets.append(torch.zeros(e.shape[0], 3, dtype=torch.long, device=e.device))
            buf = torch.zeros(3, input_ids.shape[0], dtype=torch.long, device=input_ids.device)
            buf[:, is_multimodal.to(input_ids.device)] = torch.cat(offsets).to(input_ids.device).t()
            self._offsets = buf
            multimodal_embeddings = stripped
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        """Stock's forward with the kept image tokens' offsets added to their positions."""
        offsets, self._offsets = self._offsets, None
        if offsets is not None and positions.dim() == 2:
            n = min(offsets.shape[1], positions.shape[1])
            positions = positions.clone()
            positions[:, :n] += offsets[:, :n].to(positions.device, positions.dtype)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """vLLM's loading, plus a copy of the scoring block's ``norm1`` / ``attn.qkv`` weights."""
        copy = QwenScoreWeights(self.globalcom2_score, self._readout.score_block)
        loaded = super().load_weights(copy.keep(weights))
        return loaded | copy.check()


@MULTIMODAL_REGISTRY.register_processor(
    GlobalCom2Qwen2_5_VLMultiModalProcessor,
    info=GlobalCom2Qwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class GlobalCom2Qwen2_5_VLForConditionalGeneration(_CompressedQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM Qwen2.5-VL that feeds its language model the image tokens a globalcom2 method keeps."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self._globalcom2_init(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._globalcom2_modules()


@MULTIMODAL_REGISTRY.register_processor(
    GlobalCom2Qwen3VLMultiModalProcessor,
    info=GlobalCom2Qwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class GlobalCom2Qwen3VLForConditionalGeneration(_CompressedQwen, Qwen3VLForConditionalGeneration):
    """vLLM Qwen3-VL that feeds its language model (and its DeepStack layers) the image tokens a method keeps."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        self._globalcom2_init(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._globalcom2_modules()


__all__ = [
    "GlobalCom2Qwen2_5_VLForConditionalGeneration",
    "GlobalCom2Qwen3VLForConditionalGeneration",
]
