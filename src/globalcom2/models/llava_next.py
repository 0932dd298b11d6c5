"""Adapter for stock ``transformers`` LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

It knows where the model keeps its vision tower, projector and newline embedding, reads all
geometry from the config, and owns the one narrow place where visual features become the
language model's input. Nothing here edits a library class.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import core
from ..methods.base import ImageContext, MethodConfig, Selection
from . import scoring
from .common import PackedInputs, check_class, flatten_views, pack, text_embeddings  # noqa: F401  (re-exported)

try:  # the processor's own rule, so the grid always matches the pixel values it produced
    from transformers.image_processing_utils import select_best_resolution
except ImportError:  # pragma: no cover - very old transformers
    select_best_resolution = None


FAMILY = "llava_next"
SUPPORTED_CLASSES = ("LlavaNextForConditionalGeneration",)
CONFIG_CLASSES = ("LlavaNextConfig",)
#: stock ``forward``/``generate`` arguments that describe the images; the patched model consumes them
VISION_KWARGS = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")


# --------------------------------------------------------------------------------------------
# Validation and geometry
# --------------------------------------------------------------------------------------------


def _encoder_layers(tower: nn.Module):
    for path in ("vision_model.encoder.layers", "encoder.layers"):
        obj = tower
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    return None


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


def check_encoder_tower(tower: nn.Module, kind: str, extra: str = "") -> None:
    """TypeError unless ``tower``'s layers have what the scores are recomputed from (layer_norm1, q/k projections)."""
    layers = _encoder_layers(tower)
    last = layers[-1] if layers is not None and len(layers) else None
    attn = getattr(last, "self_attn", None)
    if last is None or not all(hasattr(m, n) for m, n in ((last, "layer_norm1"), (attn, "q_proj"), (attn, "k_proj"))):
        raise TypeError(
            f"the vision tower must be {kind} (layers with layer_norm1 and self_attn.q_proj/k_proj){extra}; "
            f"got {type(tower).__name__}"
        )


def check_model(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` is a stock AnyRes LLaVA-NeXT this adapter supports."""
    check_class(model, SUPPORTED_CLASSES)
    check_config(model.config)
    check_encoder_tower(model.model.vision_tower, "a CLIP-style encoder", " with a [CLS] token")
    emb = getattr(getattr(model.model.vision_tower, "vision_model", model.model.vision_tower), "embeddings", None)
    if getattr(emb, "class_embedding", None) is None:
        raise TypeError(
            "the vision tower has no [CLS] token (embeddings.class_embedding); [CLS]-attention "
            f"methods need one. Got {type(model.model.vision_tower).__name__}"
        )


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

    def stock_tokens(self, image_size: tuple[int, int]) -> int:
        """Visual tokens stock LLaVA-NeXT feeds its LLM for one image (thumbnail + unpadded crops + newlines)."""
        grid = self.grid(image_size)
        top, bottom, left, right = core.unpadded_box(grid, self.side, image_size, round_digits=7)
        return self.side**2 + (bottom - top) * (right - left + 1)


# --------------------------------------------------------------------------------------------
# Vision side: features, [CLS] scores, selection, packing
# --------------------------------------------------------------------------------------------


@dataclass
class ImageRecord:
    """What happened to one image: its geometry, the selection and the emitted order."""

    image_size: tuple[int, int]
    grid: tuple[int, int]
    side: int
    valid: torch.Tensor  # (n, N) bool
    selection: Selection
    order: torch.Tensor  # (T,) indices into concat(views.flatten(0, 1), newline)
    scores: torch.Tensor  # (1 + n, N)

    @property
    def num_tokens(self) -> int:
        """Visual tokens the language model receives for this image."""
        return int(self.order.numel())

    def kept_per_view(self) -> torch.Tensor:
        """(1 + n,) number of tokens of each view that reach the language model."""
        n_views = 1 + self.grid[0] * self.grid[1]
        N = self.side**2
        idx = self.order[self.order < n_views * N]
        return torch.bincount(idx // N, minlength=n_views)

    def kept_mask(self) -> torch.Tensor:
        """(1 + n, N) bool, which tokens of each view reach the language model."""
        n_views = 1 + self.grid[0] * self.grid[1]
        N = self.side**2
        mask = torch.zeros(n_views * N, dtype=torch.bool, device=self.order.device)
        mask[self.order[self.order < n_views * N]] = True
        return mask.view(n_views, N)


def _image_sizes_list(image_sizes) -> list[tuple[int, int]]:
    if image_sizes is None:
        raise ValueError(
            "image_sizes is required with pixel_values: pass the processor's output unchanged "
            "(it returns image_sizes as (height, width) per image)"
        )
    try:
        sizes = torch.as_tensor(image_sizes.cpu() if isinstance(image_sizes, torch.Tensor) else image_sizes)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"image_sizes must be (height, width) pairs, one per image, got {image_sizes!r}") from err
    if (
        sizes.dim() != 2
        or sizes.shape[1] != 2
        or sizes.shape[0] == 0
        or sizes.is_complex()
        or sizes.dtype == torch.bool
    ):
        raise ValueError(
            f"image_sizes must be a (number of images, 2) array of (height, width) pairs as the processor "
            f"returns it, got shape {tuple(sizes.shape)}"
        )
    if sizes.is_floating_point() and not bool((sizes == sizes.round()).all()):
        raise ValueError(f"image_sizes must hold whole pixel counts, got {sizes.tolist()}")
    out = [(int(h), int(w)) for h, w in sizes.tolist()]
    if any(h <= 0 or w <= 0 for h, w in out):
        raise ValueError(f"image_sizes must hold positive (height, width) pairs, got {out}")
    return out


def feature_layer(model: nn.Module, layer=None) -> int | list[int]:
    """The validated ``vision_feature_layer`` (call-time ``layer`` or the config's): an index into the
    vision tower's hidden states (``num_hidden_layers + 1`` of them), or a list of such indices when
    the model's projector is built for several layers."""
    configured = model.config.vision_feature_layer
    layer = configured if layer is None else layer
    n = len(_encoder_layers(model.model.vision_tower))
    allowed = f"an int in [{-(n + 1)}, {n}] (an index into the vision tower's {n + 1} hidden states)"

    def ok(x) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool) and -(n + 1) <= int(x) <= n

    if isinstance(configured, (list, tuple)):
        if not isinstance(layer, (list, tuple)) or len(layer) != len(configured) or not all(map(ok, layer)):
            raise ValueError(
                f"vision_feature_layer must be a list of {len(configured)} indices, each {allowed}, for this model "
                f"(its projector takes {len(configured)} layers' features, config: {configured}); got {layer!r}"
            )
        return [int(x) for x in layer]
    if not ok(layer):
        raise ValueError(
            f"vision_feature_layer must be {allowed} for this model (its projector takes one layer's features); "
            f"got {layer!r}"
        )
    return int(layer)


def check_vision_inputs(model: nn.Module, pixel_values, image_sizes, overrides: dict):
    """Validate the processor's outputs and call-time vision options before any work.

    returns: (pixel_values as (sum V_i, C, H, W), image sizes, views per image, feature layer).
    """
    cfg = model.config
    geo = Geometry.from_config(cfg)
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a float tensor from the processor, got {type(pixel_values).__name__}")
    sizes = _image_sizes_list(image_sizes)
    n_views = [1 + geo.grid(s)[0] * geo.grid(s)[1] for s in sizes]
    pixel_values = flatten_views(pixel_values, n_views, geo.image_size)
    strategy = overrides.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
    if strategy != "default":
        raise ValueError(f"vision_feature_select_strategy must be 'default' while compressing, got {strategy!r}")
    layer = feature_layer(model, overrides.get("vision_feature_layer"))
    return pixel_values, sizes, n_views, layer


def _f32_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``lin(x)`` in float32 (scores are computed in float32 whatever the model's dtype)."""
    bias = lin.bias.float() if lin.bias is not None else None
    return F.linear(x.float(), lin.weight.float(), bias)


def _scoring_layer(layers, hidden_states: tuple, layer: int, what: str) -> tuple[nn.Module, torch.Tensor, int]:
    """(encoder layer, its ``layer_norm1`` input (V, T, D), hidden-state index) of the layer producing
    ``hidden_states[layer]``; ValueError for index 0 (the embeddings: no layer's attention made them)."""
    pos = layer % (len(layers) + 1)  # index into hidden_states: hidden_states[i] is the output of layer i - 1
    if pos == 0:
        raise ValueError(
            f"vision_feature_layer 0 selects the embeddings, which no encoder layer's {what} produced; "
            f"need a layer index other than 0 or {-len(layers) - 1}"
        )
    lyr = layers[pos - 1]
    return lyr, lyr.layer_norm1(hidden_states[pos - 1]), pos


def _num_heads(tower: nn.Module, attn: nn.Module) -> int:
    return getattr(attn, "num_heads", None) or tower.config.num_attention_heads


def _cls_scores(tower: nn.Module, hidden_states: tuple, score: str, layer: int = -1) -> torch.Tensor:
    """(V, N) [CLS] attention of one encoder layer, recomputed from the hidden state entering it.

    hidden_states: the tower's ``output_hidden_states`` tuple (embeddings, then each layer's output).
    layer: index into ``hidden_states`` like ``vision_feature_layer``: the attention of the layer whose
        output that is (-1 and ``num_layers`` are the last layer, -2 the one before).
    Works whatever attention kernel the tower uses (eager, SDPA, flash): only the layer norm and
    the q/k projections of that layer are re-applied, for the [CLS] query alone.
    """
    what = "[CLS] attention (methods scoring by the feature layer's attention, e.g. fastervlm)"
    lyr, x, _ = _scoring_layer(_encoder_layers(tower), hidden_states, layer, what)  # x: (V, 1+N, D)
    attn = lyr.self_attn
    num_heads = _num_heads(tower, attn)
    scale = getattr(attn, "scale", (x.shape[-1] // num_heads) ** -0.5)
    q_cls = _f32_linear(attn.q_proj, x[:, 0]) * scale  # (V, D)
    keys = _f32_linear(attn.k_proj, x)  # (V, 1+N, D)
    return core.cls_attention(q_cls, keys, num_heads, score)


def layer_qk_tokens(
    layers, hidden_states: tuple, layer: int, num_heads: int, has_cls: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, tokens) of one encoder layer of a CLIP/SigLIP-style tower, recomputed from its hidden states.

    hidden_states: the tower's ``output_hidden_states`` tuple; layer: index into it like
    ``vision_feature_layer`` (the layer whose *output* that is). q: (V, T, D) float32 queries times the
    head scale, k: (V, T, D) float32 keys of the layer (from ``layer_norm1`` of its input), tokens:
    (V, N, D) its output without the [CLS] token. Any attention kernel works.
    """
    lyr, x, pos = _scoring_layer(layers, hidden_states, layer, "attention")  # x: (V, T, D)
    attn = lyr.self_attn
    scale = getattr(attn, "scale", (x.shape[-1] // num_heads) ** -0.5)
    tokens = hidden_states[pos]
    return _f32_linear(attn.q_proj, x) * scale, _f32_linear(attn.k_proj, x), tokens[:, 1:] if has_cls else tokens


def tower_scores(
    tower: nn.Module, hidden_states: tuple, scorer: str, score: str, layer: int, has_cls: bool = True
) -> torch.Tensor:
    """(V, N) float32 rating of every patch token by ``scorer`` (a concrete ``scoring.SCORERS`` name).

    "cls" is the [CLS] row of ``layer``'s attention (``_cls_scores``); the others come from that layer's
    recomputed queries/keys (``attention_received``) or its output tokens (``global_dissimilarity``,
    which projects nothing).
    """
    if scorer == "cls":
        return _cls_scores(tower, hidden_states, score, layer)
    layers = _encoder_layers(tower)
    num_heads = _num_heads(tower, layers[0].self_attn)
    if scorer == "global_dissimilarity":
        _, _, pos = _scoring_layer(layers, hidden_states, layer, "attention")
        tokens = hidden_states[pos]
        return scoring.view_scores(scorer, None, None, tokens[:, 1:] if has_cls else tokens, num_heads, has_cls)
    q, k, tokens = layer_qk_tokens(layers, hidden_states, layer, num_heads, has_cls)
    return scoring.view_scores(scorer, q, k, tokens, num_heads, has_cls, score)


def encode_views(
    model: nn.Module,
    pixel_values: torch.Tensor,
    image_sizes,
    score: str = "logits",
    score_layer: int | None = -1,
    return_hidden: bool = False,
    scorer: str = "cls",
    **overrides,
):
    """Run the vision tower once over every view of every image.

    pixel_values: (B, V_max, C, H, W) as the processor returns it, or (sum V_i, C, H, W).
    score, score_layer: which [CLS] attention to return ("logits"/"softmax"; the attention of the layer
        producing ``hidden_states[score_layer]``, -1 the last layer; None means ``vision_feature_layer``).
    scorer: "cls" (default), "attention_received" or "global_dissimilarity" (``models.scoring``), from
        the same layer; "auto" is "cls" on this [CLS] tower.
    returns: (features, scores, sizes): per image (V_i, N, D_llm) projected features and
        (V_i, N) [CLS] scores, plus the (height, width) of each image; with ``return_hidden`` also
        the tower's hidden-state tuple (embeddings, then each layer's output) over all views.
    """
    pixel_values, sizes, n_views, layer = check_vision_inputs(model, pixel_values, image_sizes, overrides)

    tower = model.model.vision_tower
    out = tower(pixel_values, output_hidden_states=True, return_dict=True)
    hs = out.hidden_states
    feats = hs[layer] if isinstance(layer, int) else torch.cat([hs[i] for i in layer], dim=-1)
    feats = model.model.multi_modal_projector(feats[:, 1:])  # (sum V, N, D_llm)
    score_layer = layer if score_layer is None else score_layer
    if not isinstance(score_layer, int):
        raise ValueError(
            f"vision_feature_layer must be one int with this method (it ranks tokens by the [CLS] attention of "
            f"the feature layer), got {score_layer!r}"
        )
    scorer = scoring.resolve_scorer(scorer, has_cls=True, tower=type(tower).__name__)
    with torch.no_grad():  # scores only rank tokens; gradients flow through the kept features as in stock
        scores = tower_scores(tower, hs, scorer, score, score_layer)  # (sum V, N)
    if return_hidden:
        return list(feats.split(n_views)), list(scores.split(n_views)), sizes, hs
    return list(feats.split(n_views)), list(scores.split(n_views)), sizes


def _layer_keys(tower: nn.Module, hidden_states: tuple, layer: int = -1) -> torch.Tensor:
    """(V, 1 + N, d_head) float32 keys of one encoder layer averaged over heads, [CLS] first.

    Recomputed from the hidden state entering that layer (``layer_norm1`` then ``k_proj``), so it
    works under any attention kernel; VisionZip's merge metric.
    """
    layers = _encoder_layers(tower)
    pos = layer % len(layers)
    lyr = layers[pos]
    keys = _f32_linear(lyr.self_attn.k_proj, lyr.layer_norm1(hidden_states[pos]))  # (V, 1+N, D)
    num_heads = _num_heads(tower, lyr.self_attn)
    v, t, d = keys.shape
    return keys.view(v, t, num_heads, d // num_heads).mean(dim=2)  # (V, 1+N, d_head)


def method_inputs(
    model: nn.Module,
    cfg: MethodConfig,
    hidden_states: tuple,
    n_views: list[int],
    sizes: list[tuple[int, int]],
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    vision_feature_layer=None,
) -> list[dict]:
    """Per image, the optional ``ImageContext`` inputs ``cfg.needs`` lists beyond features (hidden, keys, text).

    hidden_states: the tower's hidden-state tuple over all views of all images, images in order.
    Nothing is computed for a method that needs none of them.
    """
    out: list[dict] = [{} for _ in n_views]
    needs = cfg.needs
    layer = model.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    if "hidden" in needs:
        hid = hidden_states[layer] if isinstance(layer, int) else torch.cat([hidden_states[i] for i in layer], dim=-1)
        for d, h in zip(out, hid.split(n_views)):  # (V_i, 1+N, D_vis)
            d["hidden"] = h
    if "keys" in needs:
        score_layer = cfg.score_source[0]
        score_layer = layer if score_layer is None else score_layer
        with torch.no_grad():
            keys = _layer_keys(model.model.vision_tower, hidden_states, score_layer)  # (sum V, 1+N, d_head)
        for d, k in zip(out, keys.split(n_views)):
            d["keys"] = k
    if "text" in needs and input_ids is not None:
        geo = Geometry.from_config(model.config)
        texts = text_embeddings(model, input_ids, attention_mask, [geo.stock_tokens(s) for s in sizes])
        for d, t in zip(out, texts):
            d["text"] = t
    return out


def emit(model: nn.Module, rec: ImageRecord, features: torch.Tensor) -> torch.Tensor:
    """(T, D_llm) tokens the language model receives for one image. features: (V, N, D_llm).

    A gather of ``concat(views.flatten(0, 1), newline)`` by ``rec.order``; methods that emit
    vision-space tokens of their own (``Selection.extra``, e.g. merged tokens) get them projected
    by the model's projector and appended to that source first.
    """
    parts = [features.flatten(0, 1), model.model.image_newline[None].to(features.device, features.dtype)]
    extra = rec.selection.extra
    if extra is not None and extra.shape[0]:
        proj = model.model.multi_modal_projector
        parts.append(proj(extra.to(features.device, features.dtype)).to(features.dtype))  # (M, D_llm)
    return torch.cat(parts, dim=0)[rec.order.to(features.device)]


@torch.no_grad()
def stock_features(model: nn.Module, pixel_values: torch.Tensor, image_sizes, **overrides):
    """Stock LLaVA-NeXT visual tokens per image (the model's own vision path). returns (features, sizes)."""
    _, sizes, _, layer = check_vision_inputs(model, pixel_values, image_sizes, overrides)
    sizes_t = torch.tensor(sizes, device=pixel_values.device)
    overrides = {**overrides, "vision_feature_layer": layer, "vision_feature_select_strategy": "default"}
    # output_hidden_states explicitly: transformers derives it from the layer index, so layer 0 got none
    out = model.model.get_image_features(
        pixel_values, sizes_t, return_dict=True, output_hidden_states=True, **overrides
    )
    return list(out.pooler_output), sizes


def select_image(cfg: MethodConfig, scores: torch.Tensor, image_size, geo: Geometry, index: int = 0, **inputs):
    """Run the method on one image. scores: (V, N); inputs: optional ``ImageContext`` fields. -> ``ImageRecord``."""
    grid = geo.grid(image_size)
    if cfg.unpad:
        box = core.unpadded_box(grid, geo.side, image_size, round_digits=cfg.unpad_rounding)
    else:
        box = (0, grid[0] * geo.side, 0, grid[1] * geo.side)
    valid = core.box_mask(box, grid, geo.side, device=scores.device)
    ctx = ImageContext(
        scores=scores.float(), side=geo.side, grid=grid, valid=valid, box=box, image_index=index, **inputs
    )
    sel = cfg.select(ctx)
    order = cfg.order(sel, ctx)
    return ImageRecord(tuple(image_size), grid, geo.side, valid, sel, order, scores)


def compress(
    model: nn.Module,
    cfg: MethodConfig,
    pixel_values: torch.Tensor,
    image_sizes,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **overrides,
):
    """Visual tokens for the LLM, per image, plus a record of what was kept.

    input_ids, attention_mask: the prompt, read only by methods that need its text (``"text"`` in ``cfg.needs``).
    returns: (features, records): per image a (T_i, D_llm) tensor and an ``ImageRecord``.
    """
    layer, kind = cfg.score_source
    scorer = getattr(cfg, "scorer", "auto")
    feats, scores, sizes, hs = encode_views(
        model, pixel_values, image_sizes, score=kind, score_layer=layer, return_hidden=True, scorer=scorer, **overrides
    )
    geo = Geometry.from_config(model.config)
    extras = method_inputs(
        model, cfg, hs, [f.shape[0] for f in feats], sizes, input_ids, attention_mask,
        overrides.get("vision_feature_layer"),
    )  # fmt: skip
    out, records = [], []
    for i, (f, s, size, extra) in enumerate(zip(feats, scores, sizes, extras)):
        if "features" in cfg.needs:
            extra["features"], extra["newline"] = f, model.model.image_newline.to(f.device, f.dtype)
        rec = select_image(cfg, s, size, geo, index=i, **extra)
        out.append(emit(model, rec, f))
        records.append(rec)
    return out, records


def prepare_images(
    model: nn.Module,
    cfg: MethodConfig,
    pixel_values: torch.Tensor,
    vision_kwargs: dict,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
):
    """The adapter's entry point for a patched call.

    vision_kwargs: the call's ``VISION_KWARGS`` (``image_sizes`` and the vision overrides).
    returns: (features per image (T_i, D_llm), stock placeholder count per image, records or None):
        stock features for in-LLM methods (the pruning happens inside the language model), the
        compressed ones and an ``ImageRecord`` per image otherwise.
    """
    vision_kwargs = dict(vision_kwargs)
    image_sizes = vision_kwargs.pop("image_sizes", None)
    geo = Geometry.from_config(model.config)
    if cfg.where == "llm":
        feats, sizes = stock_features(model, pixel_values, image_sizes, **vision_kwargs)
        records = None
    else:
        feats, records = compress(
            model, cfg, pixel_values, image_sizes, input_ids=input_ids, attention_mask=attention_mask, **vision_kwargs
        )
        sizes = [r.image_size for r in records]
    return feats, [geo.stock_tokens(s) for s in sizes], records


def geometry_context(cfg: MethodConfig, config, image_size: tuple[int, int]) -> ImageContext:
    """An ``ImageContext`` holding the geometry of one image (zero scores), unpadded as ``cfg`` unpads."""
    geo = Geometry.from_config(config)
    grid = geo.grid(image_size)
    if cfg.unpad:
        box = core.unpadded_box(grid, geo.side, image_size, round_digits=cfg.unpad_rounding)
    else:
        box = (0, grid[0] * geo.side, 0, grid[1] * geo.side)
    valid = core.box_mask(box, grid, geo.side)  # (n, N)
    scores = torch.zeros(1 + valid.shape[0], geo.side**2)  # (1 + n, N), never read
    return ImageContext(scores=scores, side=geo.side, grid=grid, valid=valid, box=box)
