"""Adapter for stock ``transformers`` LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``).

What stock OneVision feeds its language model for one image (``modeling_llava_onevision.py``,
``pack_image_features``; the processor counts the same): the base view (the whole image resized to
one S x S view, S = image_size / patch_size, no [CLS] token: SigLIP) first, then the crops of the
AnyRes grid (``image_grid_pinpoints``, up to 6 x 6 views) stitched into one (nph S) x (npw S) map,
unpadded (``unpad_image``, rounding to 7 digits), bilinearly *downscaled* to
(int(h // q), int(w // q)) when ``q = sqrt(h w / (m S^2)) > 1.1`` for ``vision_aspect_ratio =
"anyres_max_m"``, and a newline token after every row of that map. An image of a multi-image
prompt (``batch_num_images`` > 1 for its sample) is the base view alone (the processor pads it to a
square) plus one newline token.

How GlobalCom² transfers (the authors did not release their OneVision code; see issue #1 of their
repository), and what every vision-side method of the registry sees here:

* **Where selection happens: on the emitted grid.** After the downscale a crop token of the LLM's
  input is a bilinear blend of several crop patches, so patches no longer map 1:1 to tokens. The
  candidates are therefore the tokens stock OneVision emits (the unpadded, downscaled map); their
  scores are the per-patch scores pooled the same way (the same unpadding and the same bilinear
  interpolation, applied to the score map); each emitted token belongs to the crop holding its
  centre (for output row i of an h -> h' resize, grid row ``top + (i + 0.5) h / h'``). Inside its
  crop an emitted token takes a slot of that crop's S x S block such that the slots keep the raster
  order and each crop's emitted rows/columns stay contiguous (without downscale: its true position).
  Methods thus see an ordinary ``ImageContext`` (``valid`` marks the slots; ``N_j`` is the number of
  emitted tokens of crop j) and need no OneVision code.
* **Scores without [CLS].** SigLIP has no [CLS] token: ``scorer="auto"`` is
  ``"global_dissimilarity"`` (minus the cosine similarity of a token to its view's mean token, of the
  scoring layer's output); ``"attention_received"`` is available; ``"cls"`` is refused at ``apply``.
* **Layout.** The authors' LLaVA-NeXT layout (``layout="authors"``: a newline after every row of the
  padded grid, kept tokens packed to the front of each crop) has no OneVision counterpart and would
  hand the LLM rows it never saw; kept tokens are laid out as stock OneVision lays them out
  (``"spatial"``: true raster order, a newline after every emitted row) — ``method_config`` maps
  ``layout="authors"`` to ``"spatial"`` (also for ``num_image_tokens``). ``unpad=False``
  (fastervlm's default) keeps its layout meaning (no newlines); the candidates stay the emitted grid.
* **Counts.** With N = S^2, the emitted map h' x w' and its N_j per crop, GlobalCom² with
  ``budget="exact"`` gives ``int(N R) + round(R sum_j N_j) + h'``; with R = 1 and the neutral options
  (``thumbnail_order="spatial"``) the LLM input is stock's, token for token.
* **Not supported** (clear error at ``apply``): ``visionzip`` (its dominant set is each view's [CLS]
  token and its merge reads [CLS]-first hidden states), ``scorer="cls"``, video inputs
  (``pixel_values_videos``), ``vision_feature_select_strategy`` other than ``"full"``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.image_processing_utils import select_best_resolution  # the processor's own rule

from .. import core
from ..core import scoring
from ..core.context import ImageContext
from ..methods.base import TRANSFORMERS_UNPAD_DIGITS, MethodConfig
from . import towers
from .base import (  # noqa: F401  (pack, text_embeddings re-exported)
    Compressed,
    EncodedViews,
    FamilyAdapter,
    ImageBatch,
    ImageRecord,
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

FAMILY = "llava_onevision"
SUPPORTED_CLASSES = ("LlavaOnevisionForConditionalGeneration",)
CONFIG_CLASSES = ("LlavaOnevisionConfig",)
#: stock ``forward``/``generate`` arguments that describe the images (videos only to refuse them)
VISION_KWARGS = (
    "image_sizes",
    "vision_feature_layer",
    "vision_feature_select_strategy",
    "vision_aspect_ratio",
    "batch_num_images",
    "pixel_values_videos",
    "image_sizes_videos",
)
TOWER = "SigLIP (LLaVA-OneVision's vision tower, no [CLS] token)"
#: SigLIP has no [CLS] token (``scorer="auto"`` resolves to "global_dissimilarity")
HAS_CLS = False
#: methods that cannot run on this family, with the reason
UNSUPPORTED_METHODS = {
    "visionzip": "its dominant tokens include every view's [CLS] token and its merge reads [CLS]-first hidden "
    "states; LLaVA-OneVision's SigLIP tower has no [CLS] token",
}


# --------------------------------------------------------------------------------------------
# Validation and geometry
# --------------------------------------------------------------------------------------------


def parse_aspect_ratio(vision_aspect_ratio) -> int:
    """m of ``"anyres_max_m"``: the emitted crop map is downscaled above about m views' worth of tokens."""
    match = re.fullmatch(r"anyres_max_(\d+)", vision_aspect_ratio) if isinstance(vision_aspect_ratio, str) else None
    if match is None or int(match.group(1)) < 1:
        raise ValueError(
            f"vision_aspect_ratio must be 'anyres_max_<m>' with an int m >= 1 (e.g. 'anyres_max_9'), "
            f"got {vision_aspect_ratio!r}"
        )
    return int(match.group(1))


def check_config(cfg) -> None:
    """Raise a clear error unless ``cfg`` (a ``LlavaOnevisionConfig``) describes a model this adapter supports."""
    strategy = getattr(cfg, "vision_feature_select_strategy", None)
    if strategy != "full":
        raise ValueError(
            f"config.vision_feature_select_strategy must be 'full' (SigLIP has no [CLS] token to drop; every "
            f"patch token forms the S x S grid), got {strategy!r}"
        )
    if not getattr(cfg, "image_grid_pinpoints", None):
        raise ValueError("config.image_grid_pinpoints must list the AnyRes resolutions; got none")
    parse_aspect_ratio(getattr(cfg, "vision_aspect_ratio", None))
    vc = cfg.vision_config
    if vc.image_size < vc.patch_size:  # 384 / 14 is fine: SigLIP's stride-14 patches give 27 x 27 tokens
        raise ValueError(
            f"vision_config.image_size ({vc.image_size}) must be at least vision_config.patch_size ({vc.patch_size})"
        )


def check_model(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` is a stock LLaVA-OneVision this adapter supports."""
    check_class(model, SUPPORTED_CLASSES)
    check_config(model.config)
    towers.check_encoder_tower(model.model.vision_tower, "a SigLIP/CLIP-style encoder")


def method_config(cfg: MethodConfig, config=None) -> MethodConfig:
    """The config a method runs with on this family: ``layout="authors"`` becomes ``"spatial"``; ValueError
    for what cannot run (``visionzip``, ``scorer="cls"``), before the model is touched."""
    return ADAPTER.resolve(cfg, config)


@dataclass(frozen=True)
class Layout:
    """Where one image's emitted crop tokens sit: the unpadded box, the emitted map and its slots."""

    grid: tuple[int, int]  # (nph, npw) crops
    box: tuple[int, int, int, int]  # (top, bottom, left, right) unpadded box in padded-grid space
    emitted: tuple[int, int]  # (h', w') emitted crop map (= box size unless downscaled)
    rows: torch.Tensor  # (h',) long grid row of each emitted row's slot
    cols: torch.Tensor  # (w',) long grid column of each emitted column's slot

    @property
    def downscaled(self) -> bool:
        """Whether the unpadded map is bilinearly resized (anyres_max)."""
        return self.emitted != (self.box[1] - self.box[0], self.box[3] - self.box[2])


def _slots(start: int, length: int, emitted: int, side: int, bands: int) -> torch.Tensor:
    """(emitted,) long grid index of the slot of every emitted row (or column) of one axis.

    An emitted row i covers ``start + (i + 0.5) length / emitted`` (its centre) in padded-grid space; it
    belongs to the crop band holding that centre and takes the slot after the band's previous
    emitted row, the band's first one sitting at its centre. Without downscale: ``start + i``.
    """
    i = torch.arange(emitted, dtype=torch.float64)
    centre = start + (i + 0.5) * (length / emitted)  # (E,)
    band = torch.div(centre, side, rounding_mode="floor").long().clamp(max=bands - 1)  # (E,) nondecreasing
    first = torch.searchsorted(band, band)  # (E,) index of the band's first emitted row
    return centre[first].floor().long() + (torch.arange(emitted) - first)


@dataclass(frozen=True)
class Geometry:
    """Geometry of a LLaVA-OneVision model, read from its config."""

    image_size: int  # pixels per side of one view
    patch_size: int  # pixels per side of one patch
    pinpoints: tuple[tuple[int, int], ...]  # (height, width) AnyRes resolutions
    max_views: int  # m of anyres_max_m

    @property
    def side(self) -> int:
        """S, tokens per side of one view (floor: 384 px views of 14 px patches give 27, as SigLIP and stock)."""
        return self.image_size // self.patch_size

    @classmethod
    def from_config(cls, config, vision_aspect_ratio: str | None = None) -> Geometry:
        """Geometry of ``config`` (a ``LlavaOnevisionConfig``); ``vision_aspect_ratio`` overrides the config's."""
        vc = config.vision_config
        pins = tuple(tuple(int(x) for x in p) for p in config.image_grid_pinpoints)
        aspect = vision_aspect_ratio or config.vision_aspect_ratio
        return cls(vc.image_size, vc.patch_size, pins, parse_aspect_ratio(aspect))

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(nph, npw) crop grid the processor uses for an image of (height, width)."""
        h, w = select_best_resolution([int(image_size[0]), int(image_size[1])], [list(p) for p in self.pinpoints])
        return h // self.image_size, w // self.image_size

    def layout(self, image_size: tuple[int, int]) -> Layout:
        """Unpadded box, emitted map (stock's anyres_max rule) and slots of one image's crop tokens."""
        grid, s = self.grid(image_size), self.side
        box = core.unpadded_box(grid, s, image_size, round_digits=TRANSFORMERS_UNPAD_DIGITS)
        h, w = box[1] - box[0], box[3] - box[2]
        ratio = math.sqrt(h * w / (self.max_views * s**2))
        eh, ew = (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)
        return Layout(grid, box, (eh, ew), _slots(box[0], h, eh, s, grid[0]), _slots(box[2], w, ew, s, grid[1]))

    def stock_tokens(self, image_size: tuple[int, int], single_view: bool = False) -> int:
        """Visual tokens stock OneVision feeds its LLM for one image (base view + emitted crop map + newlines)."""
        if single_view:
            return self.side**2 + 1
        eh, ew = self.layout(image_size).emitted
        return self.side**2 + eh * (ew + 1)


def _valid(lay: Layout, side: int, device=None) -> torch.Tensor:
    """(n, N) bool, the slots of the emitted crop tokens."""
    nph, npw = lay.grid
    occupied = torch.zeros(nph * side, npw * side, dtype=torch.bool, device=device)
    occupied[lay.rows.to(device)[:, None], lay.cols.to(device)[None, :]] = True
    return core.grid_to_crops(occupied, lay.grid, side)


def _context_geometry(lay: Layout | None, side: int, device=None):
    """(grid, valid (n, N), box) of an ``ImageContext``; ``lay`` None is a single-view image.

    A single-view image is a 1 x 1 grid with no crop token and one newline row (box (0, 1, 0, 0)), so
    the "spatial" layout emits stock's base view + newline. A downscaled image has no box: its newline
    rows are the rows holding slots.
    """
    if lay is None:
        return (1, 1), torch.zeros(1, side * side, dtype=torch.bool, device=device), (0, 1, 0, 0)
    return lay.grid, _valid(lay, side, device), (None if lay.downscaled else lay.box)


# --------------------------------------------------------------------------------------------
# Vision side
# --------------------------------------------------------------------------------------------


def feature_layer(model: nn.Module, layer=None) -> int | list[int]:
    """The validated ``vision_feature_layer`` (call-time ``layer`` or the config's), see ``towers.feature_layer``."""
    n = len(towers.encoder_layers(model.model.vision_tower))
    return towers.feature_layer(model.config.vision_feature_layer, layer, n)


def check_call(model: nn.Module, kwargs: dict) -> None:
    """Raise ValueError for call options compression cannot honour (video inputs), before any work."""
    if kwargs.get("pixel_values_videos") is not None:
        raise ValueError(
            "pixel_values_videos: video inputs are not supported by globalcom2 on LLaVA-OneVision (GlobalCom² "
            "compresses a thumbnail + AnyRes crops; video frames are pooled views without crops); call "
            "globalcom2.remove(model) for videos, or pass images"
        )


def _batch_num_images(batch_num_images, n_images: int) -> list[int] | None:
    if batch_num_images is None:
        return None
    values = batch_num_images.tolist() if isinstance(batch_num_images, torch.Tensor) else batch_num_images
    try:
        values = [v for v in values]
    except TypeError:
        values = None
    ok = values is not None and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values)
    if not ok or any(v < 0 for v in values) or sum(values) != n_images:
        raise ValueError(
            f"batch_num_images must list the number of images of every sample (ints >= 0 summing to the "
            f"{n_images} images of image_sizes), as the processor returns it; got {batch_num_images!r}"
        )
    return [int(v) for v in values]


def check_vision_inputs(model: nn.Module, pixel_values, vision_kwargs: dict):
    """Validate the processor's outputs and call-time vision options before any work.

    returns: (pixel_values (sum V_i, C, H, W), sizes, crops flag per image, views per image, feature layer,
        geometry).
    """
    cfg = model.config
    check_call(model, vision_kwargs)
    check_pixel_values(pixel_values)
    check_channels(pixel_values, cfg.vision_config.num_channels)
    strategy = vision_kwargs.get("vision_feature_select_strategy") or cfg.vision_feature_select_strategy
    if strategy != "full":
        raise ValueError(
            f"vision_feature_select_strategy must be 'full' on LLaVA-OneVision while compressing (SigLIP has no "
            f"[CLS] token to drop), got {strategy!r}"
        )
    geo = Geometry.from_config(cfg, vision_kwargs.get("vision_aspect_ratio"))
    sizes = image_sizes_list(vision_kwargs.get("image_sizes"))
    counts = _batch_num_images(vision_kwargs.get("batch_num_images"), len(sizes))
    patched = [True] * len(sizes) if counts is None else [n == 1 for n in counts for _ in range(n)]
    n_views = [1 + geo.grid(s)[0] * geo.grid(s)[1] if p else 1 for s, p in zip(sizes, patched)]
    pixel_values = flatten_views(pixel_values, n_views, geo.image_size, " (and batch_num_images)")
    layer = feature_layer(model, vision_kwargs.get("vision_feature_layer"))
    return pixel_values, sizes, patched, n_views, layer, geo


def _grid_map(x: torch.Tensor, lay: Layout, side: int) -> torch.Tensor:
    """(C, h', w') the emitted crop map of x: (n, N, C) per-crop values, as stock ``pack_image_features``
    builds it (stitch, unpad, bilinear downscale when anyres_max asks)."""
    nph, npw = lay.grid
    m = x.view(nph, npw, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()  # (C, nph, S, npw, S)
    m = m.flatten(1, 2).flatten(2, 3)  # (C, nph S, npw S)
    top, bottom, left, right = lay.box
    m = m[:, top:bottom, left:right]  # (C, h, w) unpadded
    if lay.downscaled:
        m = F.interpolate(m[None], list(lay.emitted), mode="bilinear")[0]  # (C, h', w')
    return m


def _to_slots(emitted: torch.Tensor, lay: Layout, side: int) -> torch.Tensor:
    """(n, N, C) per-crop tensor holding the emitted map (C, h', w') at its slots, zeros elsewhere."""
    nph, npw = lay.grid
    out = emitted.new_zeros(nph * side, npw * side, emitted.shape[0])  # (nph S, npw S, C)
    rows, cols = lay.rows.to(emitted.device), lay.cols.to(emitted.device)
    out[rows[:, None], cols[None, :]] = emitted.permute(1, 2, 0)
    return core.grid_to_crops(out, lay.grid, side)


def virtual_views(
    features: torch.Tensor, scores: torch.Tensor, lay: Layout | None, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 + n, N, D) features and (1 + n, N) scores of one image as methods see them: the base view, then
    every crop's slots holding the emitted (unpadded, downscaled) crop map, the scores pooled the same way.

    features: (V, N, D) projected features of the image's views; scores: (V, N) float32.
    """
    if lay is None:  # single view: an empty 1 x 1 crop grid
        return torch.cat([features, torch.zeros_like(features)]), torch.cat([scores, torch.zeros_like(scores)])
    crop_f = _to_slots(_grid_map(features[1:], lay, side), lay, side)  # (n, N, D)
    crop_s = _to_slots(_grid_map(scores[1:, :, None], lay, side), lay, side)[..., 0]  # (n, N)
    return torch.cat([features[:1], crop_f]), torch.cat([scores[:1], crop_s])


def encode_views(model: nn.Module, cfg: MethodConfig, pixel_values: torch.Tensor, vision_kwargs: dict) -> EncodedViews:
    """Run the vision tower once over every view of every image and rate every token by ``cfg.requires``.

    ``geometry`` of the result: per image its emitted crop ``Layout``, or None for a single-view image of a
    multi-image prompt.
    """
    pixel_values, sizes, patched, n_views, layer, geo = check_vision_inputs(model, pixel_values, vision_kwargs)
    tower = model.model.vision_tower
    hs = tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
    feats = model.model.multi_modal_projector(towers.features_of(hs, layer))  # (sum V, N, D_llm)
    req = cfg.requires
    index = layer if req.score_layer is None else req.score_layer
    if not isinstance(index, int):
        raise ValueError(
            f"vision_feature_layer must be one int with method {cfg.name!r} (it rates tokens by the feature "
            f"layer), got {index!r}"
        )
    scorer = scoring.resolve_scorer(req.scorer, has_cls=False, tower=TOWER)
    with torch.no_grad():  # scores only rank tokens; gradients flow through the kept features as in stock
        scores = towers.tower_scores(tower, hs, scorer, req.score, index, has_cls=False)  # (sum V, N)
    layouts = [geo.layout(s) if p else None for s, p in zip(sizes, patched)]
    return EncodedViews(list(feats.split(n_views)), list(scores.split(n_views)), hs, n_views, sizes, layouts)


def select_image(
    cfg: MethodConfig, features: torch.Tensor, scores: torch.Tensor, image_size, lay: Layout | None, side: int,
    index: int = 0, **inputs,
) -> tuple[ImageRecord, torch.Tensor]:  # fmt: skip
    """Run the method on one image. features: (V, N, D); scores: (V, N). -> (record, virtual features)."""
    views, vscores = virtual_views(features, scores.float(), lay, side)
    grid, valid, box = _context_geometry(lay, side, scores.device)
    if "features" in cfg.needs:
        inputs["features"] = views
    ctx = ImageContext(scores=vscores, side=side, grid=grid, valid=valid, box=box, image_index=index, **inputs)
    return select_in_context(cfg, ctx, tuple(image_size), features.shape[0])[2], views


def compress(
    model: nn.Module, cfg: MethodConfig, pixel_values: torch.Tensor, image_sizes=None,
    input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **vision_kwargs,
) -> Compressed:  # fmt: skip
    """Visual tokens for the LLM, per image, plus a record of what was kept.

    vision_kwargs: ``batch_num_images`` and the vision overrides, from the processor / the call.
    returns: ``Compressed(features, records)``: per image a (T_i, D_llm) tensor and an ``ImageRecord``.
    """
    vision_kwargs = {**vision_kwargs, "image_sizes": image_sizes}
    cfg = ADAPTER.resolve(cfg, model.config)
    enc = encode_views(model, cfg, pixel_values, vision_kwargs)
    geo = Geometry.from_config(model.config, vision_kwargs.get("vision_aspect_ratio"))
    if "text" in cfg.needs:
        if input_ids is None:
            raise ValueError(
                f"method {cfg.name!r} ranks visual tokens against the prompt's text: pass input_ids (and "
                "attention_mask) with pixel_values"
            )
        stock = [geo.stock_tokens(s, lay is None) for s, lay in zip(enc.sizes, enc.geometry)]
        texts = text_embeddings(model, input_ids, attention_mask, stock)
    newline = model.model.image_newline
    out, records = [], []
    for i, (f, s, size, lay) in enumerate(zip(enc.features, enc.scores, enc.sizes, enc.geometry)):  # images
        extra = {"newline": newline.to(f.device, f.dtype)} if "features" in cfg.needs else {}
        if "text" in cfg.needs:
            extra["text"] = texts[i]
        rec, views = select_image(cfg, f, s, size, lay, geo.side, index=i, **extra)
        out.append(emit(views, rec.order, newline))
        records.append(rec)
    return Compressed(out, records)


@torch.no_grad()
def stock_features(model: nn.Module, pixel_values: torch.Tensor, vision_kwargs: dict) -> list[torch.Tensor]:
    """Stock OneVision visual tokens per image (the model's own vision path)."""
    _, sizes, patched, _, layer, geo = check_vision_inputs(model, pixel_values, vision_kwargs)
    dev = pixel_values.device
    counts = vision_kwargs.get("batch_num_images")
    out = model.model.get_image_features(
        pixel_values,
        torch.tensor(sizes, device=dev),
        vision_feature_layer=layer,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{geo.max_views}",
        batch_num_images=None if counts is None else torch.as_tensor(counts, device=dev),
        return_dict=True,
        output_hidden_states=True,
    )
    return list(out.pooler_output)


def geometry_context(cfg: MethodConfig, config, image_size: tuple[int, int]) -> ImageContext:
    """An ``ImageContext`` holding the geometry of one (single-image prompt) image, zero scores."""
    geo = Geometry.from_config(config)
    grid, valid, box = _context_geometry(geo.layout(image_size), geo.side)
    scores = torch.zeros(1 + valid.shape[0], geo.side**2)  # (1 + n, N), never read
    return ImageContext(scores=scores, side=geo.side, grid=grid, valid=valid, box=box)


def patch_masks(rec: ImageRecord, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, content): (nph S, npw S) bool maps over the crop patches, for drawing (``globalcom2 viz``).

    content: the patch is image (not letterbox padding); kept: the emitted token covering the patch
    reaches the language model (after a downscale one token covers about q x q patches).
    """
    geo = Geometry.from_config(config)
    lay = geo.layout(rec.image_size)
    s, (nph, npw) = geo.side, lay.grid
    top, bottom, left, right = lay.box
    (h, w), (eh, ew) = (bottom - top, right - left), lay.emitted
    slots_kept = core.crops_to_grid(rec.kept_mask()[1:].cpu(), lay.grid, s)  # (nph S, npw S)
    cell_r = torch.div(torch.arange(h) * eh, max(h, 1), rounding_mode="floor")  # (h,) emitted row of each patch row
    cell_c = torch.div(torch.arange(w) * ew, max(w, 1), rounding_mode="floor")  # (w,)
    kept = torch.zeros(nph * s, npw * s, dtype=torch.bool)
    kept[top:bottom, left:right] = slots_kept[lay.rows[cell_r][:, None], lay.cols[cell_c][None, :]]
    content = core.crops_to_grid(core.box_mask(lay.box, lay.grid, s), lay.grid, s)
    return kept, content


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


class LlavaOnevisionAdapter(FamilyAdapter):
    """LLaVA-OneVision: SigLIP without [CLS], base view + AnyRes crops, unpadding and anyres_max downscale."""

    family = FAMILY
    display_name = "LLaVA-OneVision"
    model_classes = SUPPORTED_CLASSES
    config_classes = CONFIG_CLASSES
    vision_kwargs = VISION_KWARGS
    has_cls = HAS_CLS
    tower_name = TOWER
    unsupported_methods = UNSUPPORTED_METHODS
    checkpoints = ("llava-hf/llava-onevision-qwen2-7b-ov-hf", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf")

    check_config = staticmethod(check_config)
    check_model = staticmethod(check_model)
    compress_images = staticmethod(compress)

    def check_call(self, model: nn.Module, kwargs: dict) -> None:
        """Video inputs are refused (``check_call``)."""
        check_call(model, kwargs)

    def resolve(self, cfg: MethodConfig, config) -> MethodConfig:
        """``layout="authors"`` runs as ``"spatial"`` (stock OneVision's layout) and cdpruner on stock's unpadded
        layout (``unpad=True``: the padded-grid branch its authors' code executes is LLaVA-NeXT's, and OneVision's
        crop map is downscaled after unpadding); visionzip and scorer="cls" refused."""
        cfg = super().resolve(cfg, config)
        if cfg.requires.layout == "authors" and "layout" in cfg.option_names():
            cfg = dataclasses.replace(cfg, layout="spatial")
        if cfg.name == "cdpruner" and not cfg.unpad:
            cfg = dataclasses.replace(cfg, unpad=True)
        return cfg

    def stock_counts(self, model, pixel_values, vision_kwargs, input_ids=None) -> list[int]:
        """Base view + emitted crop map + newlines (a multi-image prompt's image: base view + one newline)."""
        _, sizes, patched, _, _, geo = check_vision_inputs(model, pixel_values, vision_kwargs)  # no tower run
        return [geo.stock_tokens(s, not p) for s, p in zip(sizes, patched)]

    def stock_features(self, model, pixel_values, vision_kwargs, input_ids=None) -> list[torch.Tensor]:
        """See ``stock_features``."""
        return stock_features(model, pixel_values, vision_kwargs)

    def geometry_context(self, cfg: MethodConfig, config, image_size: tuple[int, int], processor=None) -> ImageContext:
        """Zero-score context of one single-image-prompt image (emitted crop map slots)."""
        return geometry_context(cfg, config, image_size)

    def stock_token_count(self, config, image_size: tuple[int, int], processor=None) -> int:
        """Base view + emitted crop map + one newline per emitted row."""
        return Geometry.from_config(config).stock_tokens(image_size)

    def patch_masks(self, rec: ImageRecord, config) -> tuple[torch.Tensor, torch.Tensor]:
        """Kept emitted tokens drawn over the patches they pool (``patch_masks``)."""
        return patch_masks(rec, config)


ADAPTER = LlavaOnevisionAdapter()
