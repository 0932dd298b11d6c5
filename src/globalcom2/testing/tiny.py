"""Offline stand-ins: a tiny random-weight LLaVA-NeXT, a local tokenizer/processor, test images.

Nothing here downloads anything. The weights are random, so the model's words are noise; it
exists to exercise the real ``transformers`` code paths end to end in seconds.
"""

from __future__ import annotations

import numpy as np
import torch

WORDS = (
    "a an the is are what where which who how many color of in on at to and this that image picture "
    "photo show shows describe there it left right top bottom red green blue yellow black white cat dog "
    "car tree sky text sign number one two three four five yes no please answer question user assistant"
).split()
SPECIALS = ("<unk>", "<pad>", "<s>", "</s>", "<image>")
#: ``tiny_model`` keywords of the demo model: real LLaVA-NeXT geometry (336 px views, 14 px patches), narrow layers
DEMO_SHAPE = dict(
    image_size=336, patch_size=14, vision_hidden=64, vision_layers=4, text_hidden=256, text_layers=4, text_heads=4
)


def word_level_tokenizer(tokens: tuple[str, ...], **special):
    """A word-level fast tokenizer over ``tokens`` (ids in order; ``<unk>`` among them), whitespace and
    punctuation pre-tokenized; ``special``: ``PreTrainedTokenizerFast`` keywords (pad/eos tokens, padding side...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


def tiny_tokenizer():
    """A word-level fast tokenizer built in memory, with ``<image>`` as a special token."""
    fast = word_level_tokenizer(
        SPECIALS + tuple(WORDS) + tuple("?.,:!\n"), pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        padding_side="left",
    )  # fmt: skip
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def tiny_config(
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 4,
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    text_intermediate: int | None = None,
    vocab_size: int | None = None,
    pinpoints: list[list[int]] | None = None,
    text_init_std: float = 0.3,
):
    """A ``LlavaNextConfig`` shaped like LLaVA-NeXT (CLIP tower, Llama LM, AnyRes pinpoints), but tiny.

    ``text_init_std`` is larger than the usual 0.02 so that greedy decoding of the random model
    produces varied tokens, which makes "same tokens as ..." tests meaningful.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    tok = tiny_tokenizer()
    vocab_size = vocab_size or len(tok)
    s = image_size
    pinpoints = pinpoints or [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=text_intermediate or 2 * text_hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads,
        num_key_value_heads=text_heads,
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=text_init_std,
    )
    return LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        initializer_range=text_init_std,
    )


def tiny_model(
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    **config_kwargs,
):
    """A random-weight ``LlavaNextForConditionalGeneration`` (eval mode) from ``tiny_config``."""
    from transformers import LlavaNextForConditionalGeneration

    cfg = tiny_config(**config_kwargs)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg)
    model = model.to(dtype)
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    return model.eval()


def pil_image_processor_class() -> type:
    """LLaVA-NeXT's PIL/NumPy image processor class, whichever name this ``transformers`` gives it.

    ``LlavaNextImageProcessorPil`` (module ``image_processing_pil_llava_next``) first ships in
    transformers 5.4.0; before that the PIL/NumPy processor is ``LlavaNextImageProcessor`` itself
    (5.4 gave that name to the torchvision backend, which needs torchvision).
    """
    try:
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    except ImportError:  # transformers < 5.4
        from transformers import LlavaNextImageProcessor

        return LlavaNextImageProcessor
    return LlavaNextImageProcessorPil


def tiny_processor(image_size: int = 112, patch_size: int = 14, pinpoints: list[list[int]] | None = None):
    """A ``LlavaNextProcessor`` matching ``tiny_config`` (PIL image backend, local tokenizer)."""
    from transformers import LlavaNextProcessor

    s = image_size
    pinpoints = pinpoints or [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
    image_processor = pil_image_processor_class()(
        size={"shortest_edge": s},
        crop_size={"height": s, "width": s},
        image_grid_pinpoints=pinpoints,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def demo_image(*, height: int = 220, width: int = 300, seed: int = 0):
    """A synthetic RGB test picture (gradient sky, sun, blocks, stripes) of ``height`` x ``width`` px, as a PIL
    image (``image.size`` is PIL's (width, height)). Keyword-only, so the order cannot be mixed up."""
    from PIL import Image, ImageDraw

    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int (pixels), got {value!r}")

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3), dtype=np.uint8)
    img[..., 0] = (80 + 100 * y / max(height - 1, 1)).astype(np.uint8)
    img[..., 1] = (120 + 80 * x / max(width - 1, 1)).astype(np.uint8)
    img[..., 2] = 200
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    draw_int = lambda lo, hi: int(rng.integers(lo, max(hi, lo + 1)))  # any size, even 1 px (same draws otherwise)
    for _ in range(6):
        x0, y0 = draw_int(0, width * 3 // 4), draw_int(height // 3, height * 3 // 4)
        w, h = draw_int(width // 10, width // 4), draw_int(height // 8, height // 4)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=color)
    r = max(min(width, height) // 10, 2)
    draw.ellipse([width - 3 * r, r, width - r, 3 * r], fill=(250, 220, 40))
    for i in range(0, width, max(width // 16, 2)):
        draw.line([i, height - 4, i + width // 32, height - 1], fill=(20, 20, 20), width=2)
    return pil
