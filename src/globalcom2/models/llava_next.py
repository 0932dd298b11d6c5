"""Adapter for stock ``transformers`` LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

It knows where the model keeps its vision tower, projector and newline embedding, reads all
geometry from the config, and owns the one narrow place where visual features become the
language model's input. Nothing here edits a library class. Sections, as in every family file:
validation, geometry, vision side (encode, select, compress), the adapter class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.image_processing_utils import select_best_resolution  # the processor's own rule

from .. import core
from ..core import scoring
from ..core.context import ImageContext
from ..methods.base import TRANSFORMERS_UNPAD_DIGITS, MethodConfig
from . import towers
from .base import (  # noqa: F401  (PackedInputs, pack, text_embeddings re-exported)
    Compressed,
    EncodedViews,
    FamilyAdapter,
    ImageBatch,
    ImageRecord,
    PackedInputs,
    check_channels,
    check_class,
    check_pixel_values,
    emit,
    flatten_views,
    image_sizes_list,
    pack,
    select_in_context,
    text_embeddings,
)

FAMILY = "llava_next"
SUPPORTED_CLASSES = ("LlavaNextForConditionalGeneration",)
CONFIG_CLASSES = ("LlavaNextConfig",)
#: stock ``forward``/``generate`` arguments that describe the images; the patched model consumes them
VISION_KWARGS = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def check_config(cfg) -> None:
    """Raise a clear error unless ``cfg`` (a ``LlavaNextConfig``) describes an AnyRes model this adapter supports."""
    strategy = getattr(cfg, "vision_feature_select_strategy", None)
    if strategy != "default":
        raise ValueError(
            f"config.vision_feature_select_strategy must be 'default' (the [CLS] token is dropped, "
            f"patch tokens form the S x S grid), got {strategy!r}"
        )
    if not getattr(cfg, "image_grid_pinpoints", None):
        raise ValueError("config.image_grid_pinpoints must list the AnyRes resolutions; got none")
    vc = cfg.vision_config
    if vc.image_size % vc.patch_size:
        raise ValueError(
            f"vision_config.image_size ({vc.image_size}) must be a multiple of vision_config.patch_size "
            f"({vc.patch_size})"
        )


def check_model(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` is a stock AnyRes LLaVA-NeXT this adapter supports."""
    check_class(model, SUPPORTED_CLASSES)
    check_config(model.config)
    towers.check_encoder_tower(model.model.vision_tower, "a CLIP-style encoder", " with a [CLS] token")
    emb = getattr(getattr(model.model.vision_tower, "vision_model", model.model.vision_tower), "embeddings", None)
    if getattr(emb, "class_embedding", None) is None:
        raise TypeError(
            "the vision tower has no [CLS] token (embeddings.class_embedding); [CLS]-attention "
            f"methods need one. Got {type(model.model.vision_tower).__name__}"
        )


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """Geometry of a LLaVA-NeXT model, read from its config."""

    image_size: int  # pixels per side of one view
    patch_size: int  # pixels per side of one patch
    pinpoints: tuple[tuple[int, int], ...]  # (height, width) AnyRes resolutions

    @property
    def side(self) -> int:
        """S, tokens per side of one view."""
        return self.image_size // self.patch_size

    @classmethod
    def from_config(cls, config) -> Geometry:
        """Geometry of ``config`` (a ``LlavaNextConfig``)."""
        vc = config.vision_config
        return cls(vc.image_size, vc.patch_size, tuple(tuple(int(x) for x in p) for p in config.image_grid_pinpoints))

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(nph, npw) crop grid the processor uses for an image of (height, width)."""
        h, w = select_best_resolution([int(image_size[0]), int(image_size[1])], [list(p) for p in self.pinpoints])
        return h // self.image_size, w // self.image_size

    def views(self, image_size: tuple[int, int]) -> int:
        """Views the processor makes of an image of (height, width): the thumbnail and the crops."""
        nph, npw = self.grid(image_size)
        return 1 + nph * npw

    def stock_tokens(self, image_size: tuple[int, int]) -> int:
        """Visual tokens stock LLaVA-NeXT feeds its LLM for one image (thumbnail + unpadded crops + newlines)."""
        grid = self.grid(image_size)
        top, bottom, left, right = core.unpadded_box(
            grid, self.side, image_size, round_digits=TRANSFORMERS_UNPAD_DIGITS
        )
        return self.side**2 + (bottom - top) * (right - left + 1)

    def context(self, cfg: MethodConfig, image_size: tuple[int, int], scores: torch.Tensor | None = None,
                index: int = 0, **inputs) -> ImageContext:  # fmt: skip
        """The ``ImageContext`` of one image: crops unpadded as ``cfg`` unpads them; scores (1 + n, N) or zeros."""
        grid, req = self.grid(image_size), cfg.requires
        if req.unpad:
            box = core.unpadded_box(grid, self.side, image_size, round_digits=req.unpad_rounding)
        else:
            box = (0, grid[0] * self.side, 0, grid[1] * self.side)
        device = None if scores is None else scores.device
        valid = core.box_mask(box, grid, self.side, device=device)  # (n, N)
        if scores is None:
            scores = torch.zeros(1 + valid.shape[0], self.side**2)  # never read by a size-only count
        if not req.unpad:  # candidates are the padded grid: say what stock's sequence is (``methods.stock_length``)
            sbox = core.unpadded_box(grid, self.side, image_size, round_digits=TRANSFORMERS_UNPAD_DIGITS)
            svalid = core.box_mask(sbox, grid, self.side, device=device)
            thumb = torch.arange(self.side**2, device=device)
            stock = core.assemble_order(thumb, svalid, svalid, grid, self.side, "spatial", sbox)
            inputs.setdefault("stock_order", stock)
        return ImageContext(
            scores=scores.float(), side=self.side, grid=grid, valid=valid, box=box, image_index=index, **inputs
        )


# --------------------------------------------------------------------------------------------
# Vision side: inputs, tower pass, selection
# --------------------------------------------------------------------------------------------


def feature_layer(model: nn.Module, layer=None) -> int | list[int]:
    """The validated ``vision_feature_layer`` (call-time ``layer`` or the config's), see ``towers.feature_layer``."""
    n = len(towers.encoder_layers(model.model.vision_tower))
    return towers.feature_layer(model.config.vision_feature_layer, layer, n)


def check_vision_inputs(model: nn.Module, pixel_values, vision_kwargs: dict):
    """Validate the processor's outputs and call-time vision options before any work.

    returns: (pixel_values as (sum V_i, C, H, W), image sizes, views per image, feature layer).
    """
    cfg = model.config
    geo = Geometry.from_config(cfg)
    check_pixel_values(pixel_values)
    check_channels(pixel_values, cfg.vision_config.num_channels)
    sizes = image_sizes_list(vision_kwargs.get("image_sizes"))
    n_views = [geo.views(s) for s in sizes]
    pixel_values = flatten_views(pixel_values, n_views, geo.image_size)
    strategy = vision_kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
    if strategy != "default":
        raise ValueError(f"vision_feature_select_strategy must be 'default' while compressing, got {strategy!r}")
    layer = feature_layer(model, vision_kwargs.get("vision_feature_layer"))
    return pixel_values, sizes, n_views, layer


def score_layer(cfg: MethodConfig, layer: int | list[int]) -> int:
    """The hidden-state index whose layer rates the tokens: the method's, or the feature layer (one int)."""
    index = cfg.requires.score_layer
    index = layer if index is None else index
    if not isinstance(index, int):
        raise ValueError(
            f"vision_feature_layer must be one int with method {cfg.name!r} (it ranks tokens by the attention of "
            f"the feature layer), got {index!r}"
        )
    return index


def encode_views(model: nn.Module, cfg: MethodConfig, pixel_values: torch.Tensor, vision_kwargs: dict) -> EncodedViews:
    """Run the vision tower once over every view of every image and rate every token by ``cfg.requires``.

    pixel_values: (B, V_max, C, H, W) as the processor returns it, or (sum V_i, C, H, W).
    vision_kwargs: ``image_sizes`` and the call-time vision overrides.
    """
    pixel_values, sizes, n_views, layer = check_vision_inputs(model, pixel_values, vision_kwargs)
    tower = model.model.vision_tower
    hs = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
    feats = model.model.multi_modal_projector(towers.features_of(hs, layer)[:, 1:])  # (sum V, N, D_llm)
    req = cfg.requires
    scorer = scoring.resolve_scorer(req.scorer, has_cls=True, tower=type(tower).__name__)
    with torch.no_grad():  # scores only rank tokens; gradients flow through the kept features as in stock
        scores = towers.tower_scores(tower, hs, scorer, req.score, score_layer(cfg, layer))  # (sum V, N)
    return EncodedViews(
        list(feats.split(n_views)), list(scores.split(n_views)), hs, n_views, sizes, [layer] * len(sizes)
    )


def method_inputs(
    model: nn.Module,
    cfg: MethodConfig,
    enc: EncodedViews,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> list[dict]:
    """Per image, the optional ``ImageContext`` inputs ``cfg.needs`` lists (features, hidden, keys, text).

    Nothing is computed for a method that needs none of them.
    """
    out: list[dict] = [{} for _ in enc.n_views]
    needs = cfg.needs
    if "text" in needs and input_ids is None:
        raise ValueError(
            f"method {cfg.name!r} ranks visual tokens against the prompt's text: pass input_ids (and "
            "attention_mask) with pixel_values"
        )
    layer = enc.geometry[0]
    if "features" in needs:
        newline = model.model.image_newline
        for d, f in zip(out, enc.features):
            d["features"], d["newline"] = f, newline.to(f.device, f.dtype)
    if "hidden" in needs:
        for d, h in zip(out, towers.features_of(enc.hidden_states, layer).split(enc.n_views)):  # (V_i, 1+N, D_vis)
            d["hidden"] = h
    if "keys" in needs:
        with torch.no_grad():
            keys = towers.layer_keys(model.model.vision_tower, enc.hidden_states, score_layer(cfg, layer))
        for d, k in zip(out, keys.split(enc.n_views)):  # (V_i, 1+N, d_head)
            d["keys"] = k
    if "text" in needs:
        geo = Geometry.from_config(model.config)
        texts = text_embeddings(model, input_ids, attention_mask, [geo.stock_tokens(s) for s in enc.sizes])
        for d, t in zip(out, texts):
            d["text"] = t
    return out


def select_image(cfg: MethodConfig, scores: torch.Tensor, image_size, geo: Geometry, index: int = 0, **inputs):
    """Run the method on one image. scores: (V, N); inputs: optional ``ImageContext`` fields. -> ``ImageRecord``."""
    ctx = geo.context(cfg, tuple(image_size), scores, index, **inputs)
    return select_in_context(cfg, ctx, tuple(image_size))[2]


def project_extra(model: nn.Module, rec: ImageRecord, like: torch.Tensor) -> torch.Tensor | None:
    """(M, D_llm) the record's vision-space tokens (merged / [CLS]) through the model's projector, or None."""
    extra = rec.selection.extra
    if extra is None or not extra.shape[0]:
        return None
    return model.model.multi_modal_projector(extra.to(like.device, like.dtype)).to(like.dtype)


def compress(
    model: nn.Module, cfg: MethodConfig, pixel_values: torch.Tensor, image_sizes=None,
    input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **vision_kwargs,
) -> Compressed:  # fmt: skip
    """Visual tokens for the LLM, per image, plus a record of what was kept (the patched model's own path).

    input_ids, attention_mask: the prompt, read only by methods that need its text (``"text"`` in ``cfg.needs``).
    returns: ``Compressed(features, records)``: per image a (T_i, D_llm) tensor and an ``ImageRecord``.
    """
    vision_kwargs = {**vision_kwargs, "image_sizes": image_sizes}
    enc = encode_views(model, cfg, pixel_values, vision_kwargs)
    geo = Geometry.from_config(model.config)
    newline = model.model.image_newline
    out, records = [], []
    for i, (f, s, size, extra) in enumerate(
        zip(enc.features, enc.scores, enc.sizes, method_inputs(model, cfg, enc, input_ids, attention_mask))
    ):  # loop over images
        rec = select_image(cfg, s, size, geo, index=i, **extra)
        out.append(emit(f, rec.order, newline, project_extra(model, rec, f)))
        records.append(rec)
    return Compressed(out, records)


@torch.no_grad()
def stock_features(model: nn.Module, pixel_values: torch.Tensor, vision_kwargs: dict) -> list[torch.Tensor]:
    """Stock LLaVA-NeXT visual tokens per image (the model's own vision path)."""
    _, sizes, _, layer = check_vision_inputs(model, pixel_values, vision_kwargs)
    sizes_t = torch.tensor(sizes, device=pixel_values.device)
    # output_hidden_states explicitly: transformers derives it from the layer index, so layer 0 got none
    out = model.model.get_image_features(
        pixel_values, sizes_t, return_dict=True, output_hidden_states=True,
        vision_feature_layer=layer, vision_feature_select_strategy="default",
    )  # fmt: skip
    return list(out.pooler_output)


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


class LlavaNextAdapter(FamilyAdapter):
    """LLaVA-NeXT (LLaVA-1.6): CLIP tower with [CLS], a thumbnail + AnyRes crops, unpadding, newlines."""

    family = FAMILY
    display_name = "LLaVA-NeXT"
    model_classes = SUPPORTED_CLASSES
    config_classes = CONFIG_CLASSES
    vision_kwargs = VISION_KWARGS
    has_cls = True
    tower_name = "CLIP (LLaVA-NeXT's vision tower)"
    checkpoints = ("llava-hf/llava-v1.6-vicuna-7b-hf", "llava-hf/llava-v1.6-mistral-7b-hf")

    check_config = staticmethod(check_config)
    check_model = staticmethod(check_model)
    compress_images = staticmethod(compress)

    def resolve(self, cfg: MethodConfig, config: Any) -> MethodConfig:
        """Refuse a score layer that is the embeddings (methods rating by the feature layer need a real layer)."""
        cfg = super().resolve(cfg, config)
        if cfg.where == "vision" and cfg.requires.score_layer is None:
            check_feature_layer_scores(cfg, config.vision_feature_layer, config.vision_config.num_hidden_layers)
        return cfg

    def stock_counts(self, model, pixel_values, vision_kwargs, input_ids=None) -> list[int]:
        """Thumbnail + unpadded crops + newlines of every image (``image_sizes``)."""
        geo = Geometry.from_config(model.config)
        return [geo.stock_tokens(s) for s in check_vision_inputs(model, pixel_values, vision_kwargs)[1]]

    def stock_features(self, model, pixel_values, vision_kwargs, input_ids=None) -> list[torch.Tensor]:
        """See ``stock_features``."""
        return stock_features(model, pixel_values, vision_kwargs)

    def geometry_context(
        self, cfg: MethodConfig, config: Any, image_size: tuple[int, int], processor=None
    ) -> ImageContext:
        """Zero-score context of one image, unpadded as ``cfg`` unpads."""
        return Geometry.from_config(config).context(cfg, image_size)

    def stock_token_count(self, config: Any, image_size: tuple[int, int], processor=None) -> int:
        """Thumbnail + unpadded crops + one newline per unpadded row."""
        return Geometry.from_config(config).stock_tokens(image_size)


def check_feature_layer_scores(cfg: MethodConfig, layer: Any, num_layers: int) -> None:
    """ValueError naming ``config.vision_feature_layer`` when a method that rates tokens by the feature layer's
    attention (``requires.score_layer is None``) meets a feature layer that is no encoder layer's output."""
    if isinstance(layer, (list, tuple)) or int(layer) % (num_layers + 1) == 0:
        raise ValueError(
            f"{cfg.name} ranks tokens by the attention of the layer producing the features, so "
            f"config.vision_feature_layer must be one encoder layer's output (an int in [1, {num_layers}] or "
            f"[{-num_layers}, -1]), got {layer!r}"
        )


ADAPTER = LlavaNextAdapter()
