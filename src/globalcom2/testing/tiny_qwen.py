"""Offline stand-ins for Qwen2.5-VL and Qwen3-VL: tiny random-weight models, a local tokenizer, processors.

Nothing here downloads anything. The models are the stock ``Qwen2_5_VLForConditionalGeneration`` /
``Qwen3VLForConditionalGeneration`` built from tiny configs (seeded random weights); the processors are
the stock ``Qwen2_5_VLProcessor`` / ``Qwen3VLProcessor`` over the PIL/NumPy Qwen2-VL image processor
(``Qwen2VLImageProcessorPil``, no torchvision) and a word-level tokenizer built in memory that holds
Qwen's special tokens (``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``, ``<|video_pad|>``,
``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``) and a small ChatML chat template.

Geometry is configurable (``patch_size``, ``spatial_merge_size``, ``temporal_patch_size`` and, for
Qwen2.5-VL, ``window_size`` / ``fullatt_block_indexes``) so tests can show that nothing downstream
hard-codes 14 / 28 / 2. The processor is built from the same numbers as the config.
"""

from __future__ import annotations

import torch

from .tiny import SPECIALS, WORDS, demo_image, word_level_tokenizer

__all__ = [
    "QWEN2_5_VL_7B_PROCESSOR",
    "QWEN3_VL_8B_PROCESSOR",
    "QWEN_TOKENS",
    "demo_image",
    "qwen2_5_vl_7b_config",
    "qwen3_vl_8b_config",
    "qwen_prompt",
    "tiny_qwen2_5_vl_config",
    "tiny_qwen2_5_vl_model",
    "tiny_qwen2_5_vl_processor",
    "tiny_qwen3_vl_config",
    "tiny_qwen3_vl_model",
    "tiny_qwen3_vl_processor",
    "tiny_qwen_tokenizer",
]

#: Qwen's special tokens, in the tokenizer's added-token order
QWEN_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: ChatML as Qwen-VL formats it (one ``<|vision_start|><|image_pad|><|vision_end|>`` per image item)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def qwen_prompt(question: str = "what is this ?", n_images: int = 1) -> str:
    """The ChatML user turn with ``n_images`` image slots, then the assistant header (what the template makes)."""
    return f"<|im_start|>user\n{IMAGE * n_images}{question}<|im_end|>\n<|im_start|>assistant\n"


def tiny_qwen_tokenizer(padding_side: str = "left"):
    """A word-level fast tokenizer built in memory, holding Qwen's special tokens and a ChatML template.

    ``<|endoftext|>`` is the pad token, ``<|im_end|>`` the end-of-sequence token (as in Qwen-VL).
    """
    base = tuple(t for t in SPECIALS if t != "<image>")
    fast = word_level_tokenizer(
        base + tuple(WORDS) + tuple("?.,:!"), pad_token="<|endoftext|>", eos_token="<|im_end|>",
        padding_side=padding_side, additional_special_tokens=list(QWEN_TOKENS),
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _tiny_ids(tok, init_std: float) -> dict:
    """The tiny tokenizer's pad/eos ids (no bos) and the weights' spread, for a text config."""
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": None, "eos_token_id": tok.eos_token_id,
            "initializer_range": init_std}  # fmt: skip


def _token_ids(tok) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _shapes(depth, hidden, intermediate, heads, out, patch, merge, temporal, **vision_extra) -> dict:
    """A Qwen vision config dict (both families' common keys, then the family's own)."""
    return {
        "depth": depth, "hidden_size": hidden, "intermediate_size": intermediate, "num_heads": heads,
        "patch_size": patch, "spatial_merge_size": merge, "temporal_patch_size": temporal, "out_hidden_size": out,
        **vision_extra,
    }  # fmt: skip


def _text(hidden, intermediate, layers, heads, kv_heads, vocab, max_positions, rope, **text_extra) -> dict:
    """A Qwen text config dict (both families' common keys, then the family's own)."""
    return {
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": max_positions, "rope_parameters": {"rope_type": "default", **rope}, **text_extra,
    }  # fmt: skip


def tiny_qwen2_5_vl_config(
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    temporal_patch_size: int = 2,
    window_size: int | None = None,
    vision_hidden: int = 32,
    vision_depth: int = 3,
    vision_heads: int = 4,
    fullatt_block_indexes: tuple[int, ...] = (1,),
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    mrope_section: list[int] | None = None,
    text_init_std: float = 0.3,
):
    """A ``Qwen2_5_VLConfig`` shaped like Qwen2.5-VL (windowed ViT with full-attention blocks, 2-D rope,
    RMSNorm, fused ``qkv``; Qwen2 LM with 3-D M-RoPE), but tiny.

    ``window_size`` (pixels) defaults to two merged cells (``2 * spatial_merge_size * patch_size``) so a
    small image already spans several windows, some of them cut by the image border (the real model: 112 px
    = 4 merged cells of 28 px). ``mrope_section`` must sum to head_dim / 2; by default it is split like
    the real [16, 24, 24] (for head_dim 128).
    """
    from transformers import Qwen2_5_VLConfig

    tok = tiny_qwen_tokenizer()
    head_dim = text_hidden // text_heads
    if mrope_section is None:
        half = head_dim // 2
        t = half // 4
        mrope_section = [t, (half - t) // 2, half - t - (half - t) // 2]
    window_size = window_size or 2 * spatial_merge_size * patch_size
    vision = _shapes(vision_depth, vision_hidden, 2 * vision_hidden, vision_heads, text_hidden, patch_size,
                     spatial_merge_size, temporal_patch_size, window_size=window_size,
                     fullatt_block_indexes=list(fullatt_block_indexes), initializer_range=text_init_std)  # fmt: skip
    text = _text(text_hidden, 2 * text_hidden, text_layers, text_heads, text_kv_heads, len(tok), 4096,
                 {"rope_theta": 10000.0, "mrope_section": mrope_section}, **_tiny_ids(tok, text_init_std))  # fmt: skip
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **_token_ids(tok))


def tiny_qwen3_vl_config(
    patch_size: int = 16,
    spatial_merge_size: int = 2,
    temporal_patch_size: int = 2,
    num_position_embeddings: int = 64,
    vision_hidden: int = 32,
    vision_depth: int = 3,
    vision_heads: int = 4,
    deepstack_visual_indexes: tuple[int, ...] = (0, 1),
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    head_dim: int = 16,
    mrope_section: list[int] | None = None,
    text_init_std: float = 0.3,
):
    """A ``Qwen3VLConfig`` shaped like Qwen3-VL (ViT with learned, bilinearly resampled position table,
    LayerNorm, fused ``qkv``, DeepStack mergers; Qwen3 LM with q/k norms and interleaved 3-D M-RoPE), but tiny.

    ``deepstack_visual_indexes`` are vision-block indices (< ``vision_depth``); their merged features are
    added to the outputs of the first ``len(deepstack_visual_indexes)`` LM layers. ``mrope_section`` must sum
    to head_dim / 2 (the real [24, 20, 20] for head_dim 128); the interleaved layout needs
    ``3 * mrope_section[1] <= head_dim / 2``.
    """
    from transformers import Qwen3VLConfig

    tok = tiny_qwen_tokenizer()
    if mrope_section is None:
        half = head_dim // 2
        hw = half * 20 // 64 or 1
        mrope_section = [half - 2 * hw, hw, hw]
    if max(deepstack_visual_indexes, default=-1) >= vision_depth:
        raise ValueError(f"deepstack_visual_indexes {deepstack_visual_indexes} must be < vision_depth {vision_depth}")
    vision = _shapes(vision_depth, vision_hidden, 2 * vision_hidden, vision_heads, text_hidden, patch_size,
                     spatial_merge_size, temporal_patch_size, num_position_embeddings=num_position_embeddings,
                     deepstack_visual_indexes=list(deepstack_visual_indexes),
                     initializer_range=text_init_std)  # fmt: skip
    rope = {"rope_theta": 10000.0, "mrope_section": mrope_section, "mrope_interleaved": True}
    text = _text(text_hidden, 2 * text_hidden, text_layers, text_heads, text_kv_heads, len(tok), 4096, rope,
                 head_dim=head_dim, **_tiny_ids(tok, text_init_std))  # fmt: skip
    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **_token_ids(tok))


def _finish(model, cfg, seed_std: float | None, dtype, attn_implementation):
    model = model.to(dtype)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    model.generation_config.eos_token_id = cfg.text_config.eos_token_id
    model.generation_config.bos_token_id = None
    return model.eval()


def tiny_qwen2_5_vl_model(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, **config_kwargs
):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` (eval mode) from ``tiny_qwen2_5_vl_config``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = tiny_qwen2_5_vl_config(**config_kwargs)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    return _finish(model, cfg, None, dtype, attn_implementation)


def tiny_qwen3_vl_model(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, **config_kwargs
):
    """A random-weight ``Qwen3VLForConditionalGeneration`` (eval mode) from ``tiny_qwen3_vl_config``.

    The learned position table is re-drawn with a larger spread (transformers initialises it small) so
    that image positions visibly change the tower's output.
    """
    from transformers import Qwen3VLForConditionalGeneration

    cfg = tiny_qwen3_vl_config(**config_kwargs)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(cfg)
    with torch.no_grad():
        model.model.visual.pos_embed.weight.normal_(0, 0.5)
    return _finish(model, cfg, None, dtype, attn_implementation)


def pil_image_processor_class() -> type:
    """Qwen2-VL's PIL/NumPy image processor: ``Qwen2VLImageProcessorPil`` from transformers 5.4, before that
    ``Qwen2VLImageProcessor`` itself (5.4 gave that name to the torchvision backend)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:  # transformers < 5.4
        from transformers import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor
    return Qwen2VLImageProcessorPil


def _image_processor(patch_size: int, merge_size: int, temporal_patch_size: int, min_pixels: int, max_pixels: int):
    return pil_image_processor_class()(
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )


def _processor(base: type, patch_size, spatial_merge_size, temporal_patch_size, min_pixels, max_pixels, padding_side):
    factor = patch_size * spatial_merge_size
    min_pixels = min_pixels or (2 * factor) ** 2
    max_pixels = max_pixels or (5 * factor) ** 2

    class Tiny(base):
        """Stock processor without a video processor (the Qwen2-VL video processor needs torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    # the stock class name is what save_pretrained records, so vLLM and AutoProcessor load the stock class
    Tiny.__name__ = Tiny.__qualname__ = base.__name__
    return Tiny(
        image_processor=_image_processor(patch_size, spatial_merge_size, temporal_patch_size, min_pixels, max_pixels),
        tokenizer=tiny_qwen_tokenizer(padding_side),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen2_5_vl_processor(
    patch_size: int = 14,
    spatial_merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    padding_side: str = "left",
):
    """A ``Qwen2_5_VLProcessor`` matching ``tiny_qwen2_5_vl_config`` (PIL image backend, local tokenizer).

    Images are resized (``smart_resize``) to multiples of ``patch_size * spatial_merge_size`` with between
    ``min_pixels`` and ``max_pixels`` pixels (defaults: 2x2 to 5x5 merged cells, i.e. 4 to 25 tokens).
    """
    from transformers import Qwen2_5_VLProcessor

    return _processor(
        Qwen2_5_VLProcessor, patch_size, spatial_merge_size, temporal_patch_size, min_pixels, max_pixels, padding_side
    )


def tiny_qwen3_vl_processor(
    patch_size: int = 16,
    spatial_merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    padding_side: str = "left",
):
    """A ``Qwen3VLProcessor`` matching ``tiny_qwen3_vl_config`` (PIL image backend, local tokenizer)."""
    from transformers import Qwen3VLProcessor

    return _processor(
        Qwen3VLProcessor, patch_size, spatial_merge_size, temporal_patch_size, min_pixels, max_pixels, padding_side
    )


# ------------------------------------------------------------------------------------ real checkpoint shapes

#: the real checkpoints' special token ids (both families)
REAL_TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
                  "vision_end_token_id": 151653}  # fmt: skip
#: Qwen/Qwen2.5-VL-7B-Instruct's image processor settings (its preprocessor_config.json)
QWEN2_5_VL_7B_PROCESSOR = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "merge_size": 2,
    "temporal_patch_size": 2,
}
#: Qwen/Qwen3-VL-8B-Instruct's image processor settings (its preprocessor_config.json: size shortest/longest edge)
QWEN3_VL_8B_PROCESSOR = {
    "min_pixels": 65536,
    "max_pixels": 16777216,
    "patch_size": 16,
    "merge_size": 2,
    "temporal_patch_size": 2,
}


def qwen2_5_vl_7b_config(vision_depth: int = 32, text_layers: int = 28):
    """A ``Qwen2_5_VLConfig`` with Qwen/Qwen2.5-VL-7B-Instruct's shapes (its config.json), optionally fewer layers
    (random-weight benchmarks); nothing is downloaded. ``fullatt_block_indexes`` keeps the real every-8th rule
    and always makes the last block full-attention, as in the real model."""
    from transformers import Qwen2_5_VLConfig

    full = sorted({i for i in (7, 15, 23, 31) if i < vision_depth} | {vision_depth - 1})
    vision = _shapes(vision_depth, 1280, 3420, 16, 3584, 14, 2, 2, window_size=112, fullatt_block_indexes=full,
                     tokens_per_second=2)  # fmt: skip
    rope = {"rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
    text = _text(3584, 18944, text_layers, 28, 4, 152064, 128000, rope, rms_norm_eps=1e-6)
    ids = REAL_TOKEN_IDS
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)


def qwen3_vl_8b_config(vision_depth: int = 27, text_layers: int = 36):
    """A ``Qwen3VLConfig`` with Qwen/Qwen3-VL-8B-Instruct's shapes (its config.json), optionally fewer layers."""
    from transformers import Qwen3VLConfig

    deep = [i for i in (8, 16, 24) if i < vision_depth]
    vision = _shapes(vision_depth, 1152, 4304, 16, 4096, 16, 2, 2, num_position_embeddings=2304,
                     deepstack_visual_indexes=deep)  # fmt: skip
    rope = {"rope_theta": 5000000.0, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    text = _text(4096, 12288, text_layers, 32, 8, 151936, 262144, rope, head_dim=128, rms_norm_eps=1e-6)
    ids = REAL_TOKEN_IDS
    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
