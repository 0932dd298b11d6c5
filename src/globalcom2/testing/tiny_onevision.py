"""Offline stand-ins for LLaVA-OneVision: a tiny random-weight model (SigLIP tower, Qwen2 LM) and its processor.

Shaped like ``llava-hf/llava-onevision-qwen2-*-ov-hf`` (no [CLS] token, ``vision_feature_layer=-1`` with
the ``"full"`` strategy, AnyRes pinpoints up to 6 x 6 views, ``anyres_max_9``; 90 px views of 12 px
patches, not a multiple, like 384 / 14), but with S = 7 tokens per side so that every code path
(unpadding, the bilinear downscale, multi-image prompts) runs in seconds.
Nothing here downloads anything.
"""

from __future__ import annotations

import torch

from .tiny import tiny_tokenizer


def tiny_onevision_pinpoints(image_size: int = 90, max_grid: int = 6) -> list[list[int]]:
    """Every (rows, cols) grid up to ``max_grid`` x ``max_grid`` views, as OneVision's config lists them."""
    s = image_size
    return [[s * r, s * c] for r in range(1, max_grid + 1) for c in range(1, max_grid + 1)]


def tiny_onevision_tokenizer():
    """The tiny word-level tokenizer with ``<image>`` and ``<video>`` special tokens."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    return tok


def tiny_onevision_config(
    image_size: int = 90,
    patch_size: int = 12,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
    text_init_std: float = 0.3,
):
    """A ``LlavaOnevisionConfig`` shaped like LLaVA-OneVision (SigLIP tower, Qwen2 LM), but tiny."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    tok = tiny_onevision_tokenizer()
    vision = SiglipVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        vocab_size=len(tok),
        max_position_embeddings=8192,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=text_init_std,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        video_token_index=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints or tiny_onevision_pinpoints(image_size),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        initializer_range=text_init_std,
    )


def tiny_onevision_model(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, **config_kwargs
):
    """A random-weight ``LlavaOnevisionForConditionalGeneration`` (eval mode) from ``tiny_onevision_config``."""
    from transformers import LlavaOnevisionForConditionalGeneration

    cfg = tiny_onevision_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(cfg).to(dtype)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    return model.eval()


def pil_image_processor_class() -> type:
    """OneVision's PIL/NumPy image processor: its own module from transformers 5.4, the base class before."""
    try:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )
    except ImportError:  # transformers < 5.4
        from transformers import LlavaOnevisionImageProcessor

        return LlavaOnevisionImageProcessor
    return LlavaOnevisionImageProcessorPil


def tiny_onevision_processor(
    image_size: int = 90,
    patch_size: int = 12,
    pinpoints: list[list[int]] | None = None,
    vision_aspect_ratio: str = "anyres_max_9",
):
    """A ``LlavaOnevisionProcessor`` matching ``tiny_onevision_config`` (PIL image backend, local tokenizer)."""
    from transformers import LlavaOnevisionProcessor

    image_processor = pil_image_processor_class()(
        size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints or tiny_onevision_pinpoints(image_size),
    )

    class TinyOnevisionProcessor(LlavaOnevisionProcessor):
        """Stock processor, without a video processor (torchvision-free; images only)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return TinyOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tiny_onevision_tokenizer(),
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
    )
