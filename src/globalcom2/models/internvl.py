"""Adapter for stock ``transformers`` InternVL 2.5/3 (``InternVLForConditionalGeneration``, the HF-native port).

What this family looks like to GlobalCom² (all read from the config and the processor's rules):

* **views**: an image is cut into ``rows x cols`` tiles of ``image_size`` px (GotOcr2's closest-aspect-ratio
  rule between ``min_patches`` and ``max_patches`` tiles), tiles in row-major order, then a **thumbnail tile
  last**, only when there is more than one tile. A single-tile image has no thumbnail.
* **tokens**: InternViT (a [CLS] token, q/k RMS norms) sees ``P x P`` patches per tile; pixel shuffle with
  ``downsample_ratio`` turns each ``2 x 2`` group of patches into one LLM token, so a tile is ``S x S`` tokens
  (``S = P * downsample_ratio``; 16 x 16 = 256 for 448 px tiles). No newline tokens.
* **scores**: a token's score is the mean of the scores of its ``2 x 2`` patches (in the order ``pixel_shuffle``
  groups them); patch scores come from ``models.scoring`` (``scorer="cls"`` by default) on the q/k recomputed
  from the hidden state entering the scoring layer exactly as the layer does (``layernorm_before``,
  ``q_proj``/``k_proj``, ``q_norm``/``k_norm``).
* **crop grid**: InternVL's ``forward`` takes no image sizes and its processor returns none, and the tile count
  alone does not tell a 2 x 3 grid from a 3 x 2 one. The patched model reads the arrangement from the pixel
  values themselves (``recover_grid``): every factorisation rows x cols of an image's tile count is a
  candidate; its tiles are put back together and resized to the thumbnail tile's size as the processor
  resized the image (bicubic, antialiased), and the candidate that reproduces the thumbnail tile (the last
  one) is the arrangement. The processor's output therefore goes in unchanged, as for LLaVA-NeXT.
  ``image_sizes=[(height, width), ...]`` (grid by the processor's rule with its default ``min_patches=1,
  max_patches=12``) or ``image_grids=[(rows, cols), ...]`` may still be passed: they are checked against
  the tiles, and one the tiles contradict is a ValueError naming it, never a silent guess. Where the
  thumbnail cannot tell the candidates apart (a flat-colour or nearly flat image: every arrangement
  reproduces it), the given one is used, else the most square candidate (ties: more columns than rows);
  it does not matter there, since the tiles are then the same picture, so stock InternVL receives the same
  input under every arrangement and the choice only moves token budgets between identical tiles.
  ``processor_grids(processor, images)`` computes the grids from the images with the processor's settings.
  Single-tile images have no thumbnail and need nothing.

Methods see an ``ImageContext`` laid out like LLaVA-NeXT's: row 0 of ``scores`` is the thumbnail, then the
``rows x cols`` crops, all crop tokens valid (InternVL has no letterbox padding). ``region_weights`` carries
the exact area of every thumbnail token over every crop's region (``core.crop_region_weights``), since the
thumbnail's ``S x S`` tokens need not split evenly into ``rows x cols`` regions. A single-tile image is its
own global view: its tile is the "thumbnail" (kept by its own scores, ``int(N R)`` tokens for GlobalCom²)
and its one crop is empty. The LLM receives the kept crop tokens tile by tile, then the kept thumbnail
tokens, each in raster order, as stock orders them (so R = 1 is the stock input).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import core
from ..core import scoring
from ..core.context import ImageContext, Selection
from ..core.layers import HiddenIndex
from ..methods.base import MethodConfig
from .base import (  # noqa: F401  (PackedInputs, pack, text_embeddings re-exported)
    Compressed,
    EncodedViews,
    FamilyAdapter,
    ImageBatch,
    ImageRecord,
    PackedInputs,
    check_class,
    check_pixel_values,
    emit,
    kept_views,
    pack,
    text_embeddings,
)

FAMILY = "internvl"
SUPPORTED_CLASSES = ("InternVLForConditionalGeneration",)
CONFIG_CLASSES = ("InternVLConfig",)
#: arguments the patched ``forward``/``generate`` consume on the vision side (``image_grids``/``image_sizes``
#: are this adapter's: stock InternVL takes neither)
VISION_KWARGS = ("image_grids", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
#: the GotOcr2 image processor's defaults, used to derive a grid from an image size
MIN_PATCHES, MAX_PATCHES = 1, 12


# --------------------------------------------------------------------------------------------
# Validation and geometry
# --------------------------------------------------------------------------------------------


def _pair(x) -> tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


def check_config(cfg) -> None:
    """Raise a clear error unless ``cfg`` (an ``InternVLConfig``) describes a model this adapter supports."""
    strategy = getattr(cfg, "vision_feature_select_strategy", None)
    if strategy != "default":
        raise ValueError(
            f"config.vision_feature_select_strategy must be 'default' (the [CLS] token is dropped and the patch "
            f"tokens are pixel-shuffled), got {strategy!r}"
        )
    vc = cfg.vision_config
    (h, w), (ph, pw) = _pair(vc.image_size), _pair(vc.patch_size)
    if h != w or ph != pw or h % ph:
        raise ValueError(
            f"vision_config.image_size ({vc.image_size}) must be square tiles made of whole square patches "
            f"(vision_config.patch_size {vc.patch_size})"
        )
    ratio = float(cfg.downsample_ratio)
    inv = round(1 / ratio) if ratio > 0 else 0
    if inv < 1 or abs(inv * ratio - 1) > 1e-9 or (h // ph) % inv:
        raise ValueError(
            f"config.downsample_ratio must be 1/k for an integer k dividing the {h // ph} patches per tile side, "
            f"got {cfg.downsample_ratio!r}"
        )
    layer = cfg.vision_feature_layer
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise ValueError(f"config.vision_feature_layer must be one int (one layer's features), got {layer!r}")
    side = (h // ph) // inv
    seq = getattr(cfg, "image_seq_length", side * side)
    if seq != side * side:
        raise ValueError(
            f"config.image_seq_length ({seq}) must equal the tokens of one tile after pixel shuffle "
            f"(({h // ph} * {ratio:g})^2 = {side * side})"
        )


def check_model(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` is a stock InternVL this adapter supports."""
    check_class(model, SUPPORTED_CLASSES)
    check_config(model.config)
    tower = model.model.vision_tower
    layers = getattr(getattr(tower, "encoder", None), "layer", None)
    last = layers[-1] if layers is not None and len(layers) else None
    attn = getattr(last, "attention", None)
    names = ("q_proj", "k_proj", "q_norm", "k_norm")
    if last is None or not hasattr(last, "layernorm_before") or not all(hasattr(attn, n) for n in names):
        raise TypeError(
            "the vision tower must be InternViT (encoder.layer[i] with layernorm_before and attention.q_proj/"
            f"k_proj/q_norm/k_norm); got {type(tower).__name__}"
        )
    if getattr(getattr(tower, "embeddings", None), "cls_token", None) is None:
        raise TypeError(f"the vision tower has no [CLS] token (embeddings.cls_token); got {type(tower).__name__}")


#: why methods that project vision-tower tokens themselves cannot run here
NO_VISION_TOKENS = (
    "it merges vision-tower tokens (hidden states, [CLS]) and projects them itself, but InternVL's projector "
    "takes pixel-shuffled 2x2 groups of patches, not single vision tokens; use one of the token-selecting "
    "methods (globalcom2, fastervlm, divprune, dart, cdpruner, ...)"
)


def crop_grid(
    image_size: tuple[int, int], tile_size: int, min_patches: int = MIN_PATCHES, max_patches: int = MAX_PATCHES
) -> tuple[int, int]:
    """(rows, cols) of tiles the InternVL (GotOcr2) processor cuts an image of (height, width) into."""
    try:  # the processor's own rule (transformers >= 5.4 names its PIL/NumPy module image_processing_pil_*)
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
    except ImportError:  # pragma: no cover - transformers < 5.4
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    cols, rows = get_optimal_tiled_canvas(
        (int(image_size[0]), int(image_size[1])), (tile_size, tile_size), min_patches, max_patches
    )
    return int(rows), int(cols)


def _image_hw(image) -> tuple[int, int]:
    if hasattr(image, "height") and hasattr(image, "width"):  # PIL
        return int(image.height), int(image.width)
    shape = tuple(image.shape)
    return (shape[-2], shape[-1]) if len(shape) == 3 and shape[0] in (1, 3, 4) else (shape[0], shape[1])


def processor_grids(processor, images) -> list[tuple[int, int]]:
    """(rows, cols) of every image as ``processor`` (an ``InternVLProcessor`` or its image processor, with its
    own ``crop_to_patches``/``min_patches``/``max_patches``/``size``) tiles it: pass as ``image_grids=``."""
    ip = getattr(processor, "image_processor", processor)
    images = images if isinstance(images, (list, tuple)) else [images]
    size = ip.size
    tile = int(size["height"] if isinstance(size, dict) else size.height)
    if not getattr(ip, "crop_to_patches", False) or int(ip.max_patches) <= 1:
        return [(1, 1)] * len(images)
    return [crop_grid(_image_hw(im), tile, int(ip.min_patches), int(ip.max_patches)) for im in images]


@dataclass(frozen=True)
class Geometry:
    """Geometry of an InternVL model, read from its config."""

    tile: int  # pixels per side of one tile
    patch: int  # pixels per side of one patch
    shuffle: int  # k: k x k patches become one token (1 / downsample_ratio)

    @property
    def patches(self) -> int:
        """P, patches per side of one tile."""
        return self.tile // self.patch

    @property
    def side(self) -> int:
        """S, LLM tokens per side of one tile (after pixel shuffle)."""
        return self.patches // self.shuffle

    @classmethod
    def from_config(cls, config) -> Geometry:
        """Geometry of ``config`` (an ``InternVLConfig``)."""
        vc = config.vision_config
        return cls(_pair(vc.image_size)[0], _pair(vc.patch_size)[0], round(1 / float(config.downsample_ratio)))

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) crop grid the processor uses (default ``min_patches``/``max_patches``)."""
        return crop_grid(image_size, self.tile)

    @staticmethod
    def views(grid: tuple[int, int]) -> int:
        """Tiles the model sees for a grid: the crops, plus the thumbnail when there is more than one."""
        n = grid[0] * grid[1]
        return n + 1 if n > 1 else 1

    def grid_tokens(self, grid: tuple[int, int]) -> int:
        """Visual tokens stock InternVL feeds its LLM for an image of this tile grid (``S^2`` per view, no newlines)."""
        return self.views(grid) * self.side**2


# --------------------------------------------------------------------------------------------
# Inputs: views per image and crop grids
# --------------------------------------------------------------------------------------------


def _placeholder_runs(input_ids: torch.Tensor, image_token_id: int) -> list[int]:
    """Lengths of the runs of consecutive image placeholders, row by row (one run per image)."""
    is_img = input_ids == image_token_id  # (B, L)
    prev = F.pad(is_img[:, :-1], (1, 0), value=False)  # (B, L) a run never continues across rows
    starts = (is_img & ~prev).flatten()  # (B L,)
    run = torch.cumsum(starts.long(), 0) - 1  # (B L,) run index of every position
    return torch.bincount(run[is_img.flatten()], minlength=int(starts.sum())).tolist()


def _grids_list(value, name: str, n_images: int) -> list[tuple[int, int]]:
    """``value`` as ``n_images`` pairs of positive ints; ValueError naming ``name`` otherwise."""
    try:
        t = torch.as_tensor(value.cpu() if isinstance(value, torch.Tensor) else value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be one pair of ints per image, got {value!r}") from err
    if t.dim() != 2 or t.shape[1] != 2 or t.shape[0] != n_images or t.dtype == torch.bool or t.is_complex():
        raise ValueError(
            f"{name} must be a ({n_images}, 2) array, one pair per image in the batch; got shape {tuple(t.shape)}"
        )
    if t.is_floating_point() and not bool((t == t.round()).all()):
        raise ValueError(f"{name} must hold whole numbers, got {t.tolist()}")
    out = [(int(a), int(b)) for a, b in t.tolist()]
    if any(a <= 0 or b <= 0 for a, b in out):
        raise ValueError(f"{name} must hold positive pairs, got {out}")
    return out


#: a candidate arrangement reproduces the thumbnail as well as the best one when its mean absolute difference
#: (normalised pixel units) is at most ``GRID_MARGIN`` times the best one's plus ``GRID_ATOL``; measured: the
#: processor's own arrangement differs from the thumbnail by 0.0004-0.12 (larger for small noisy images the
#: processor upscales), every other by 7x-2000x more (at least 0.07 on photos, documents and noise)
GRID_MARGIN, GRID_ATOL = 2.0, 5e-3


def grid_candidates(n_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, cols) with ``rows * cols == n_tiles``, most square first (ties: more columns than rows)."""
    grids = [(r, n_tiles // r) for r in range(1, n_tiles + 1) if n_tiles % r == 0]
    return sorted(grids, key=lambda g: (abs(math.log(g[1] / g[0])), g[0] > g[1]))


def arrangement_distances(tiles: torch.Tensor, thumbnail: torch.Tensor) -> dict[tuple[int, int], float]:
    """Per candidate (rows, cols) of ``grid_candidates``: how far its tiles, put together row by row and resized to
    the thumbnail's size as the processor resizes (bicubic, antialiased), are from the thumbnail tile.

    tiles: (n, C, T, T) one image's tiles in the processor's order; thumbnail: (C, T, T). Mean absolute
    difference in the pixel values' own (normalised) units.
    """
    n, ch, t, _ = tiles.shape
    tiles, thumb = tiles.detach().float(), thumbnail.detach().float()
    out = {}
    for r, c in grid_candidates(n):
        mosaic = tiles.view(r, c, ch, t, t).permute(2, 0, 3, 1, 4).reshape(1, ch, r * t, c * t)
        small = F.interpolate(mosaic, size=(t, t), mode="bicubic", antialias=True, align_corners=False)[0]
        out[(r, c)] = float((small - thumb).abs().mean())
    return out


def consistent_grids(distances: dict[tuple[int, int], float]) -> list[tuple[int, int]]:
    """The candidates (``arrangement_distances``) that reproduce the thumbnail as well as the best one
    (``GRID_MARGIN``), best first: one for any image with visible structure, several for a flat-colour one."""
    best = min(distances.values())
    return sorted((g for g, d in distances.items() if d <= GRID_MARGIN * best + GRID_ATOL), key=distances.__getitem__)


def _pick(distances: dict[tuple[int, int], float]) -> tuple[int, int]:
    best = min(distances.values())
    return next(g for g in grid_candidates(math.prod(next(iter(distances)))) if distances[g] <= best + GRID_ATOL)


def recover_grid(tiles: torch.Tensor, thumbnail: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) the processor cut an image into, read from its tiles (n, C, T, T) and thumbnail (C, T, T).

    The candidate that reproduces the thumbnail best; among those within ``GRID_ATOL`` of it (several only for a
    flat image, where every arrangement shows the same picture), the most square (ties: more columns than rows).
    """
    return _pick(arrangement_distances(tiles, thumbnail))


_CONVENTION = (
    "image_sizes holds (height, width) per image, as transformers' processors return it (PIL's image.size is "
    "(width, height): pass (image.height, image.width)); or leave it out: the arrangement is read from the "
    "pixel values"
)


def _check_given(source: str, i: int, given: tuple[int, int], views: int, value, fits: list[tuple[int, int]]) -> None:
    """ValueError naming ``source`` unless image ``i``'s ``given`` grid has its tile count and fits its thumbnail."""
    what = f"the size {tuple(value)}, a {given[0]} x {given[1]} tile grid" if source == "image_sizes" else (
        f"a {given[0]} x {given[1]} grid"
    )  # fmt: skip
    hint = _CONVENTION if source == "image_sizes" else "pass (rows, cols) per image, or leave image_grids out"
    if Geometry.views(given) != views:
        raise ValueError(
            f"{source} gives image {i} {what}, but the processor cut it into {views} tile(s)"
            + (" with a thumbnail" if views > 1 else "")
            + f"; {hint}"
            + (
                " (or pass image_grids, if the processor's min_patches/max_patches are not the defaults)"
                if source == "image_sizes"
                else ""
            )
        )
    if fits and given not in fits:
        shown = " or ".join(f"{r} x {c}" for r, c in fits)
        raise ValueError(
            f"{source} gives image {i} {what} (rows x cols), which its thumbnail contradicts: its tiles fit the "
            f"thumbnail only as {shown}; {hint}"
        )


def tile_views(model: nn.Module, pixel_values, input_ids: torch.Tensor) -> list[int]:
    """Validate the processor's output and return the views (tiles, thumbnail included) of every image, counted
    from its ``<IMG_CONTEXT>`` run in ``input_ids``. Raises ValueError naming the argument otherwise."""
    cfg = model.config
    geo = Geometry.from_config(cfg)
    check_pixel_values(pixel_values)
    want = (cfg.vision_config.num_channels, geo.tile, geo.tile)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
        raise ValueError(
            f"pixel_values must be (total tiles, {want[0]}, {want[1]}, {want[2]}) as the InternVL processor returns "
            f"it (every tile of every image, thumbnails included), got shape {tuple(pixel_values.shape)}"
        )
    seq = geo.side**2
    runs = _placeholder_runs(input_ids, cfg.image_token_id)
    if any(r % seq for r in runs):
        raise ValueError(
            f"every image needs a multiple of {seq} consecutive placeholder tokens in input_ids (one block per "
            f"tile), got runs of {runs}; pass input_ids and pixel_values from the same processor call"
        )
    views = [r // seq for r in runs]
    if sum(views) != pixel_values.shape[0]:
        raise ValueError(
            f"input_ids place {sum(views)} tiles ({views} per image) but pixel_values holds {pixel_values.shape[0]}; "
            "pass both from the same processor call"
        )
    if any(v == 2 for v in views):
        raise ValueError(
            f"input_ids give an image 2 tiles ({views} per image): the processor adds a thumbnail only to images of "
            "more than one tile; pass input_ids and pixel_values from the same processor call"
        )
    return views


def image_grids(model: nn.Module, pixel_values, input_ids: torch.Tensor, vision_kwargs: dict) -> list[tuple[int, int]]:
    """Validate the processor's output and return each image's (rows, cols) crop grid, images in batch order.

    The views of each image are counted from its ``<IMG_CONTEXT>`` run in ``input_ids`` (``tile_views``); the
    arrangement of its tiles is read from the pixel values (``recover_grid``). ``vision_kwargs["image_grids"]``
    or ``["image_sizes"]`` ((height, width), grid by the processor's default rule), when given, must agree with
    the tiles; they decide only where the thumbnail cannot (a flat image). Raises ValueError naming the argument.
    """
    views = tile_views(model, pixel_values, input_ids)
    geo = Geometry.from_config(model.config)
    source = next((k for k in ("image_grids", "image_sizes") if vision_kwargs.get(k) is not None), None)
    values = None if source is None else vision_kwargs[source]
    if source is not None:
        values = _grids_list(values, source, len(views))
        given = values if source == "image_grids" else [geo.grid(s) for s in values]
    starts = [0, *torch.tensor(views).cumsum(0).tolist()]
    grids = []
    for i, v in enumerate(views):  # loop over images
        tiles = pixel_values[starts[i] : starts[i] + v]
        dist = arrangement_distances(tiles[:-1], tiles[-1]) if v > 1 else {(1, 1): 0.0}
        if source is not None:
            _check_given(source, i, given[i], v, values[i], consistent_grids(dist))
            grids.append(given[i])
        else:
            grids.append(_pick(dist))
    return grids


# --------------------------------------------------------------------------------------------
# Vision side: features, scores, contexts
# --------------------------------------------------------------------------------------------


def feature_layer(model: nn.Module, layer=None) -> int:
    """The validated ``vision_feature_layer`` (call-time ``layer`` or the config's), an index into hidden states."""
    layer = model.config.vision_feature_layer if layer is None else layer
    n = len(model.model.vision_tower.encoder.layer)
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not -(n + 1) <= int(layer) <= n:
        raise ValueError(
            f"vision_feature_layer must be an int in [{-(n + 1)}, {n}] (an index into the vision tower's {n + 1} "
            f"hidden states) for this model, got {layer!r}"
        )
    return int(layer)


def _check_overrides(model: nn.Module, vision_kwargs: dict) -> int:
    strategy = vision_kwargs.get("vision_feature_select_strategy")
    if strategy is not None and strategy != "default":
        raise ValueError(
            f"vision_feature_select_strategy must be 'default' on InternVL (the [CLS] token is dropped before pixel "
            f"shuffle; 'full' leaves no square patch grid), got {strategy!r}"
        )
    return feature_layer(model, vision_kwargs.get("vision_feature_layer"))


def shuffle_groups(model: nn.Module, geo: Geometry, device=None) -> torch.Tensor:
    """(N, k^2) long: the patch indices (row-major in the P x P grid) that the model's ``pixel_shuffle``
    packs into each of the N = S^2 LLM tokens of a tile, tokens in output order.

    Read off by running the model's own ``pixel_shuffle`` on a map of patch indices, so it is the exact grouping.
    """
    p = geo.patches
    idx = torch.arange(p * p, dtype=torch.float64, device=device).view(1, p, p, 1)  # (1, P, P, 1)
    shuffled = model.model.pixel_shuffle(idx, scale_factor=1.0 / geo.shuffle)  # (1, S, S, k^2)
    return shuffled.reshape(geo.side**2, geo.shuffle**2).long()


def _rms(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``norm`` (InternVL's RMSNorm or Identity) applied in float32, as the layer applies it."""
    if not hasattr(norm, "variance_epsilon"):
        return x
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight.float() * x


def patch_scores(model: nn.Module, hidden_states: tuple, scorer: str, score: str, layer: int) -> torch.Tensor:
    """(V, P^2) float32 rating of every patch of every tile by ``scorer`` at the layer producing
    ``hidden_states[layer]``; q/k recomputed from the hidden state entering it as the layer computes them."""
    layers = model.model.vision_tower.encoder.layer
    index = HiddenIndex.of(layer, len(layers))
    lyr, hidden = layers[index.layer], hidden_states[index.layer_input]
    attn = lyr.attention
    x = lyr.layernorm_before(hidden).float()  # (V, 1+P^2, D)

    def proj(lin: nn.Linear) -> torch.Tensor:
        return F.linear(x, lin.weight.float(), None if lin.bias is None else lin.bias.float())

    q = _rms(attn.q_norm, proj(attn.q_proj)) * attn.scale  # (V, 1+P^2, D)
    k = _rms(attn.k_norm, proj(attn.k_proj))  # (V, 1+P^2, D)
    tokens = hidden_states[index.index][:, 1:]  # (V, P^2, D) the layer's output patches
    return scoring.view_scores(scorer, q, k, tokens, attn.num_heads, True, score)


def encode_views(
    model: nn.Module, cfg: MethodConfig, pixel_values: torch.Tensor, grids: list[tuple[int, int]], layer: int,
    with_scores: bool = True,
) -> EncodedViews:  # fmt: skip
    """Stock features and, optionally, token scores of every tile (``geometry``: each image's tile grid).

    Features are exactly as stock computes them; a token's score is the mean of its k x k patches' scores.
    """
    out = model.model.get_image_features(
        pixel_values,
        vision_feature_layer=layer,
        vision_feature_select_strategy="default",
        output_hidden_states=True,
        return_dict=True,
    )
    feats, hs = out.pooler_output, out.hidden_states
    n_views = [Geometry.views(g) for g in grids]
    if not with_scores:
        return EncodedViews(list(feats.split(n_views)), [], hs, n_views, None, list(grids))
    req = cfg.requires
    index = layer if req.score_layer is None else req.score_layer
    scorer = scoring.resolve_scorer(req.scorer, True, "InternViT")
    geo = Geometry.from_config(model.config)
    with torch.no_grad():  # scores only rank tokens; gradients flow through the kept features as in stock
        patches = patch_scores(model, hs, scorer, req.score, index)  # (sum V, P^2)
        groups = shuffle_groups(model, geo, patches.device)  # (N, k^2)
        scores = patches[:, groups].mean(dim=-1)  # (sum V, N)
    return EncodedViews(list(feats.split(n_views)), list(scores.split(n_views)), hs, n_views, None, list(grids))


def make_context(
    grid: tuple[int, int], side: int, scores: torch.Tensor | None = None, index: int = 0, **inputs
) -> ImageContext:
    """The ``ImageContext`` of one image: thumbnail first, then the crops. scores: (V, N) in the processor's
    tile order (crops, then the thumbnail when V > 1); None gives zeros. Inputs with a view axis
    (``features``) are reordered the same way.
    """
    n, n_tok = grid[0] * grid[1], side * side
    single = n == 1
    device = None if scores is None else scores.device
    if scores is None:
        scores = torch.zeros(1 if single else n + 1, n_tok)

    def views_first_thumb(x: torch.Tensor) -> torch.Tensor:  # (V, ...) -> (1 + n, ...)
        return torch.cat([x, x]) if single else torch.cat([x[-1:], x[:-1]])

    if inputs.get("features") is not None:
        inputs["features"] = views_first_thumb(inputs["features"])
    valid = torch.full((n, n_tok), not single, dtype=torch.bool, device=device)  # (n, N)
    box = (0, 0, 0, 0) if single else (0, grid[0] * side, 0, grid[1] * side)
    ar = torch.arange(n_tok, device=device)
    stock = ar if single else torch.cat([torch.arange(n_tok, (n + 1) * n_tok, device=device), ar])  # (T,)
    return ImageContext(
        scores=views_first_thumb(scores.float()),
        side=side,
        grid=grid,
        valid=valid,
        box=box,
        image_index=index,
        region_weights=core.crop_region_weights(side, grid, device=device),
        stock_order=stock,
        newlines=False,
        **inputs,
    )


def physical_order(sel: Selection, ctx: ImageContext, n_views: int) -> torch.Tensor:
    """(T,) indices into ``concat(tiles.flatten(0, 1), extra)`` (tiles in the processor's order) of the tokens
    the LLM receives.

    Without a method-decided ``sel.order``: kept crop tokens tile by tile, then kept thumbnail tokens, each in
    raster order. A method's own order (context indices: view 0 the thumbnail) is mapped to tiles; newline
    indices (InternVL has none) are dropped.
    """
    n_tok = ctx.scores.shape[1]
    v_ctx = ctx.scores.shape[0]
    if sel.order is not None:
        idx = sel.order
    else:
        dev = ctx.valid.device
        crops = sel.crop_keep.to(dev).flatten().nonzero().squeeze(1) + n_tok  # (k_c,) crop-major raster
        idx = torch.cat([crops, sel.thumb_keep.to(dev).sort().values])
    view, tok = idx // n_tok, idx % n_tok
    if n_views == 1:
        phys = torch.zeros_like(view)
    else:
        phys = torch.where(view == 0, torch.full_like(view, n_views - 1), view - 1)
    newline = v_ctx * n_tok
    out = torch.where(idx < newline, phys * n_tok + tok, n_views * n_tok + idx - newline - 1)  # (T,)
    return out[idx != newline]


def select_image(cfg: MethodConfig, features: torch.Tensor, scores: torch.Tensor, grid: tuple[int, int],
                 index: int = 0, **inputs) -> ImageRecord:  # fmt: skip
    """Run the method on one image. features: (V, N, D) and scores: (V, N) in tile order. -> ``ImageRecord``
    whose ``order`` indexes the tiles in the processor's order (``physical_order``)."""
    n_views = features.shape[0]
    if "features" in cfg.needs:
        inputs["features"], inputs["newline"] = features, features.new_zeros(features.shape[-1])  # never addressed
    side = int(round(scores.shape[1] ** 0.5))  # N = S^2 tokens per tile
    ctx = make_context(grid, side, scores, index=index, **inputs)
    sel = cfg.select(ctx)
    context_order = cfg.order(sel, ctx)
    order = physical_order(sel, ctx, n_views)
    kept = kept_views(context_order, ctx)
    return ImageRecord(None, grid, ctx.side, ctx.valid, sel, order, ctx.scores, kept, n_views)


def _call_grids(model: nn.Module, pixel_values, vision_kwargs: dict, input_ids) -> tuple[int, list[tuple[int, int]]]:
    """(feature layer, crop grid per image) of a call, validated; input_ids are required (tiles per image)."""
    if input_ids is None:
        raise ValueError("input_ids are required with pixel_values: they tell how many tiles each image has")
    layer = _check_overrides(model, vision_kwargs)
    return layer, image_grids(model, pixel_values, input_ids, vision_kwargs)


def compress(
    model: nn.Module, cfg: MethodConfig, pixel_values: torch.Tensor, image_sizes=None,
    input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **vision_kwargs,
) -> Compressed:  # fmt: skip
    """Visual tokens for the LLM, per image, plus a record of what was kept (the patched model's own path).

    input_ids: required (each image's run of ``<IMG_CONTEXT>`` tokens tells how many tiles it has);
    vision_kwargs: ``image_grids`` and the vision overrides.
    returns: ``Compressed(features, records)``: per image a (T_i, D_llm) tensor and an ``ImageRecord``.
    """
    vision_kwargs = {**vision_kwargs, "image_sizes": image_sizes}
    cfg = ADAPTER.resolve(cfg, model.config)
    layer, grids = _call_grids(model, pixel_values, vision_kwargs, input_ids)
    geo = Geometry.from_config(model.config)
    enc = encode_views(model, cfg, pixel_values, grids, layer)
    texts = [None] * len(grids)
    if "text" in cfg.needs:
        texts = text_embeddings(model, input_ids, attention_mask, [v * geo.side**2 for v in enc.n_views])
    out, records = [], []
    for i, (f, s, g, t) in enumerate(zip(enc.features, enc.scores, grids, texts)):  # loop over images
        extra = {"text": t} if "text" in cfg.needs else {}
        rec = select_image(cfg, f, s, g, index=i, **extra)
        if rec.selection.extra is not None and rec.selection.extra.shape[0]:
            raise ValueError("methods that emit vision-space tokens of their own are not supported on InternVL")
        out.append(emit(f, rec.order))
        records.append(rec)
    return Compressed(out, records)


def geometry_context(cfg: MethodConfig, config, image_size: tuple[int, int]) -> ImageContext:
    """An ``ImageContext`` holding the geometry of one image of (height, width) (zero scores)."""
    geo = Geometry.from_config(config)
    return make_context(geo.grid(image_size), geo.side)


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


class InternVLAdapter(FamilyAdapter):
    """InternVL 2.5/3: InternViT with [CLS] and q/k norms, tiles + a thumbnail tile last, pixel shuffle."""

    family = FAMILY
    display_name = "InternVL"
    model_classes = SUPPORTED_CLASSES
    config_classes = CONFIG_CLASSES
    vision_kwargs = VISION_KWARGS
    has_cls = True
    tower_name = "InternViT"
    checkpoints = ("OpenGVLab/InternVL3-8B-hf", "OpenGVLab/InternVL3-2B-hf")

    check_config = staticmethod(check_config)
    check_model = staticmethod(check_model)
    compress_images = staticmethod(compress)

    def resolve(self, cfg: MethodConfig, config) -> MethodConfig:
        """Methods that project vision-tower tokens themselves are refused; ``layout`` (where LLaVA-NeXT's
        newlines go) runs as "spatial", so no newline enters a budget (InternVL has none)."""
        cfg = super().resolve(cfg, config)
        if cfg.where == "vision" and cfg.needs & {"hidden", "keys"}:
            raise ValueError(f"method {cfg.name!r} is not supported on InternVL: {NO_VISION_TOKENS}")
        if "layout" in cfg.option_names() and cfg.requires.layout != "spatial":
            cfg = dataclasses.replace(cfg, layout="spatial")
        return cfg

    def stock_counts(self, model, pixel_values, vision_kwargs, input_ids=None) -> list[int]:
        """``S^2`` per tile of every image (tiles counted from its ``<IMG_CONTEXT>`` run)."""
        if input_ids is None:
            raise ValueError("input_ids are required with pixel_values: they tell how many tiles each image has")
        side = Geometry.from_config(model.config).side
        return [v * side**2 for v in tile_views(model, pixel_values, input_ids)]

    def stock_features(self, model, pixel_values, vision_kwargs, input_ids=None) -> list[torch.Tensor]:
        """Stock features of every image, tiles in the processor's order."""
        layer, grids = _call_grids(model, pixel_values, vision_kwargs, input_ids)
        enc = encode_views(model, None, pixel_values, grids, layer, with_scores=False)
        return [f.flatten(0, 1) for f in enc.features]

    def geometry_context(self, cfg: MethodConfig, config, image_size: tuple[int, int], processor=None) -> ImageContext:
        """Zero-score context of one image: thumbnail first, crops, no newlines."""
        return geometry_context(cfg, config, image_size)

    def stock_token_count(self, config, image_size: tuple[int, int], processor=None) -> int:
        """``S^2`` per tile (crops + thumbnail), no newlines."""
        geo = Geometry.from_config(config)
        return geo.grid_tokens(geo.grid(image_size))

    def processor_kwargs(self, processor, images: list) -> dict:
        """Nothing: the tile arrangement is read from the pixel values (``recover_grid``)."""
        return {}

    def view_pixels(self, pixel_values: torch.Tensor, rec: ImageRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """The tiles of the first image (thumbnail tile last; a single tile is its own thumbnail)."""
        n = rec.grid[0] * rec.grid[1]
        tiles = pixel_values[: n + 1 if n > 1 else 1]
        return tiles[-1], (tiles[:-1] if n > 1 else tiles)


ADAPTER = InternVLAdapter()
