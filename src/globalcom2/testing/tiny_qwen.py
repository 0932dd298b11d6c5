"""Offline stand-ins for Qwen2.5-VL and Qwen3-VL: tiny random-weight models, a local tokenizer, processors.

Nothing here downloads anything. Shapes follow the released models (windowed attention with full-attention
blocks for Qwen2.5-VL; DeepStack mergers and learned position embeddings for Qwen3-VL; M-RoPE in the
language model), but widths are small: text head_dim 32 (the smallest vLLM's CPU attention supports),
``mrope_section`` summing to head_dim / 2, DeepStack indexes inside the tower's depth.

The processors use the PIL/NumPy image processor (``Qwen2VLImageProcessorPil``), which needs no
torchvision, and no video processor; their pixel budget is small (``max_pixels``) so that an image is
a few dozen visual tokens.
"""

from __future__ import annotations

import torch

from .tiny import SPECIALS, WORDS

QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
PROMPT = "<|vision_start|><|image_pad|><|vision_end|>what is this ?"


def tiny_qwen_tokenizer():
    """A word-level fast tokenizer with Qwen's vision tokens as special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tuple(t for t in SPECIALS if t != "<image>")
    vocab = {tok: i for i, tok in enumerate(base + tuple(WORDS) + tuple("?.,:!\n"))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_TOKENS)})
    return fast


def _token_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids(list(QWEN_TOKENS))
    return dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"), ids))


def _text_kwargs(tok, text_hidden: int, text_layers: int, text_heads: int, text_init_std: float) -> dict:
    return dict(
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        vocab_size=len(tok),
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=text_init_std,
        tie_word_embeddings=False,
    )


def tiny_qwen2_5_vl_config(
    vision_hidden: int = 64,
    vision_depth: int = 2,
    vision_heads: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 2,
    text_init_std: float = 0.3,
):
    """A ``Qwen2_5_VLConfig``: 14 px patches merged 2 x 2, a windowed block then a full-attention block."""
    from transformers import Qwen2_5_VLConfig

    tok = tiny_qwen_tokenizer()
    head_dim = text_hidden // text_heads
    text = _text_kwargs(tok, text_hidden, text_layers, text_heads, text_init_std)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": _mrope(head_dim)}
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=vision_heads,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        out_hidden_size=text_hidden,
        fullatt_block_indexes=[vision_depth - 1],
        initializer_range=text_init_std,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_token_ids(tok))


def tiny_qwen3_vl_config(
    vision_hidden: int = 64,
    vision_depth: int = 3,
    vision_heads: int = 2,
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 2,
    deepstack_visual_indexes: tuple[int, ...] = (0, 1),
    text_init_std: float = 0.3,
):
    """A ``Qwen3VLConfig``: 16 px patches merged 2 x 2, DeepStack from vision layers 0 and 1 (of 3)."""
    from transformers import Qwen3VLConfig

    tok = tiny_qwen_tokenizer()
    head_dim = text_hidden // text_heads
    text = _text_kwargs(tok, text_hidden, text_layers, text_heads, text_init_std)
    text.update(
        head_dim=head_dim,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _mrope(head_dim),
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=vision_heads,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        out_hidden_size=text_hidden,
        num_position_embeddings=64,  # an 8 x 8 table, interpolated to each grid
        deepstack_visual_indexes=list(deepstack_visual_indexes),
        initializer_range=text_init_std,
    )
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_token_ids(tok))


def _mrope(head_dim: int) -> list[int]:
    """(t, h, w) rotary sections summing to head_dim / 2, in the released models' 16:24:24 proportion."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _model(cls_name: str, cfg, seed: int, attn_implementation: str, dtype: torch.dtype):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).to(dtype)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    return model.eval()


def tiny_qwen2_5_vl_model(seed: int = 0, attn_implementation: str = "sdpa", dtype=torch.float32, **config_kwargs):
    """A random-weight ``Qwen2_5_VLForConditionalGeneration`` (eval mode)."""
    return _model("Qwen2_5_VLForConditionalGeneration", tiny_qwen2_5_vl_config(**config_kwargs), seed,
                  attn_implementation, dtype)  # fmt: skip


def tiny_qwen3_vl_model(seed: int = 0, attn_implementation: str = "sdpa", dtype=torch.float32, **config_kwargs):
    """A random-weight ``Qwen3VLForConditionalGeneration`` (eval mode)."""
    return _model("Qwen3VLForConditionalGeneration", tiny_qwen3_vl_config(**config_kwargs), seed,
                  attn_implementation, dtype)  # fmt: skip


def _image_processor(patch_size: int, max_tokens: int):
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil as cls
    except ImportError:  # pragma: no cover - transformers < 5.4: the PIL/NumPy processor has the plain name
        from transformers import Qwen2VLImageProcessor as cls
    factor = patch_size * 2
    return cls(
        patch_size=patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 4 * factor * factor, "longest_edge": max_tokens * factor * factor},
    )


def _processor(cls_name: str, patch_size: int, max_tokens: int):
    import transformers

    base = getattr(transformers, cls_name)

    class TinyQwenProcessor(base):
        """Stock processor without a video processor (its class needs torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    TinyQwenProcessor.__name__ = base.__name__  # what save_pretrained records, so vLLM loads the stock class
    return TinyQwenProcessor(image_processor=_image_processor(patch_size, max_tokens), tokenizer=tiny_qwen_tokenizer())


def tiny_qwen2_5_vl_processor(max_tokens: int = 48):
    """A ``Qwen2_5_VLProcessor`` for ``tiny_qwen2_5_vl_config`` (at most ``max_tokens`` visual tokens)."""
    return _processor("Qwen2_5_VLProcessor", 14, max_tokens)


def tiny_qwen3_vl_processor(max_tokens: int = 48):
    """A ``Qwen3VLProcessor`` for ``tiny_qwen3_vl_config`` (at most ``max_tokens`` visual tokens)."""
    return _processor("Qwen3VLProcessor", 16, max_tokens)
