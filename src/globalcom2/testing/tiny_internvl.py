"""Offline stand-ins for InternVL: a tiny random-weight ``InternVLForConditionalGeneration`` and its processor.

Nothing here downloads anything. The tower is InternViT-shaped ([CLS] token, q/k RMS norms, layer
scale), the language model Qwen2 (as in the HF InternVL 2.5/3 ports), the processor the stock
``InternVLProcessor`` with the GotOcr2 tiling image processor (PIL backend) and a local tokenizer
holding ``<img>``, ``</img>`` and ``<IMG_CONTEXT>``.
"""

from __future__ import annotations

import torch

from .tiny import SPECIALS, WORDS

IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def tiny_internvl_tokenizer():
    """A word-level fast tokenizer built in memory with InternVL's image tokens as named special tokens."""
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
        extra_special_tokens=dict(IMAGE_TOKENS),
    )
    return fast


def tiny_internvl_config(
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    use_qk_norm: bool = True,
    vision_feature_layer: int = -1,
    text_init_std: float = 0.3,
):
    """An ``InternVLConfig`` shaped like InternVL 2.5/3 (InternViT with [CLS] and q/k norms, Qwen2 LM), but tiny.

    With the defaults a 112 px tile is 8 x 8 patches, i.e. 4 x 4 = 16 tokens after pixel shuffle.
    """
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    tok = tiny_internvl_tokenizer()
    vision = InternVLVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=[image_size, image_size],
        patch_size=[patch_size, patch_size],
        use_qk_norm=use_qk_norm,
        norm_type="rms_norm" if use_qk_norm else "layer_norm",
        use_mean_pooling=True,
        initializer_range=text_init_std,
    )
    text = Qwen2Config(
        hidden_size=text_hidden,
        intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads // 2,
        vocab_size=len(tok),
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=text_init_std,
        tie_word_embeddings=False,
    )
    seq = (image_size // patch_size // 2) ** 2
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=seq,
        downsample_ratio=0.5,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )


def tiny_internvl_model(
    seed: int = 0, attn_implementation: str = "sdpa", dtype: torch.dtype = torch.float32, **config_kwargs
):
    """A random-weight ``InternVLForConditionalGeneration`` (eval mode) from ``tiny_internvl_config``."""
    from transformers import InternVLForConditionalGeneration

    cfg = tiny_internvl_config(**config_kwargs)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg)
    with torch.no_grad():  # zero-initialised by transformers; random here so [CLS] and positions matter
        emb = model.model.vision_tower.embeddings
        emb.cls_token.normal_(0, 1.0)
        if emb.position_embeddings is not None:
            emb.position_embeddings.normal_(0, 0.5)
    model = model.to(dtype)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    return model.eval()


def tiny_internvl_processor(image_size: int = 112, patch_size: int = 14, min_patches: int = 1, max_patches: int = 12):
    """An ``InternVLProcessor`` matching ``tiny_internvl_config`` (GotOcr2 PIL tiling, local tokenizer)."""
    from transformers import InternVLProcessor

    try:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    except ImportError:  # pragma: no cover - transformers < 5.4: the PIL/NumPy processor has the plain name
        from transformers import GotOcr2ImageProcessor as GotOcr2ImageProcessorPil

    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size},
        crop_to_patches=True,
        min_patches=min_patches,
        max_patches=max_patches,
    )

    class TinyInternVLProcessor(InternVLProcessor):
        """Stock processor; no video processor (its base class needs torchvision, absent here)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    return TinyInternVLProcessor(
        image_processor=image_processor,
        tokenizer=tiny_internvl_tokenizer(),
        image_seq_length=(image_size // patch_size // 2) ** 2,
    )
