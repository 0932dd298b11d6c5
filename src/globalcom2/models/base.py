"""The family-adapter interface and the machinery every adapter shares.

A model family is one adapter file: a subclass of ``FamilyAdapter`` declaring every member below (class
attributes for what the family is, methods for what it does), plus its tests and one line in
``models/__init__.py``'s ``FAMILIES``. Shared here: the one ``ImageRecord`` every family returns, the
``ImageBatch`` a patched call consumes, ``emit`` (the gather that turns views into the LLM's visual
tokens), input parsing (``image_sizes_list``, ``flatten_views``), the prompt splice (``pack``) and the
prompt's text embeddings. Nothing here knows a family's geometry: in ``pack`` an image is a block of
``counts[i]`` placeholder tokens (``config.image_token_id``) in ``input_ids`` that becomes ``features[i]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from .. import core
from ..core import scoring
from ..core.context import ImageContext, Selection
from ..methods.base import MethodConfig

# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class ImageRecord:
    """What happened to one image: its geometry, the selection and the emitted order (every family).

    image_size: (height, width) of the image, or None where the family's inputs do not carry it.
    grid: (nph, npw) crops of the method's context; side: S tokens per side of a view (N = S^2).
    valid: (n, N) bool candidate crop tokens; selection: what the method kept.
    order: (T,) long indices into the family's emission source (``emit``) of the tokens the LLM receives.
    scores: (1 + n, N) the context's token scores, thumbnail first.
    kept: (1 + n, N) bool, which context tokens reach the language model (thumbnail first).
    n_views: views of the image the vision tower saw (InternVL's single tile: 1; LLaVA-NeXT: 1 + n).
    """

    image_size: tuple[int, int] | None
    grid: tuple[int, int]
    side: int
    valid: torch.Tensor
    selection: Selection
    order: torch.Tensor
    scores: torch.Tensor
    kept: torch.Tensor
    n_views: int

    @property
    def num_tokens(self) -> int:
        """Visual tokens the language model receives for this image."""
        return int(self.order.numel())

    def kept_mask(self) -> torch.Tensor:
        """(1 + n, N) bool, which tokens of each view reach the language model, thumbnail first."""
        return self.kept

    def kept_per_view(self) -> torch.Tensor:
        """(1 + n,) number of tokens of each view that reach the language model."""
        return self.kept.sum(1)


def kept_views(context_order: torch.Tensor, ctx: ImageContext) -> torch.Tensor:
    """(1 + n, N) bool: the context tokens an emission ``context_order`` (context indices) contains."""
    v, n_tok = ctx.scores.shape
    mask = torch.zeros(v * n_tok, dtype=torch.bool, device=context_order.device)
    mask[context_order[context_order < v * n_tok]] = True
    return mask.view(v, n_tok)


def select_in_context(
    cfg: MethodConfig, ctx: ImageContext, image_size: tuple[int, int] | None = None, n_views: int | None = None
) -> tuple[Selection, torch.Tensor, ImageRecord]:
    """Run a vision-side method on one image's context: (selection, context order (T,), record).

    The record's ``order`` is the context order; a family whose emission source is laid out differently
    (InternVL: tiles in the processor's order) replaces it.
    """
    sel = cfg.select(ctx)
    order = cfg.order(sel, ctx)
    views = ctx.scores.shape[0] if n_views is None else n_views
    rec = ImageRecord(image_size, ctx.grid, ctx.side, ctx.valid, sel, order, ctx.scores, kept_views(order, ctx), views)
    return sel, order, rec


def emit(
    views: torch.Tensor, order: torch.Tensor, newline: torch.Tensor | None = None, extra: torch.Tensor | None = None
) -> torch.Tensor:
    """(T, D) tokens the language model receives for one image: ``concat(views.flatten(0, 1), newline, extra)``
    gathered by ``order``.

    views: (V, N, D) projected features of the emission source; newline: (D,) the newline embedding (a zero
    row where the family has none: never addressed then); extra: (M, D) projected vision-space tokens of the
    method's own (``Selection.extra``), or None.
    """
    nl = views.new_zeros(views.shape[-1]) if newline is None else newline.to(views.device, views.dtype)
    parts = [views.flatten(0, 1), nl[None]]
    if extra is not None and extra.shape[0]:
        parts.append(extra.to(views.device, views.dtype))
    return torch.cat(parts, dim=0)[order.to(views.device)]


@dataclass
class EncodedViews:
    """The vision tower's pass over every view of every image of a call (images in batch order).

    features: per image (V_i, N, D_llm) projected features; scores: per image (V_i, N) float32 token scores
    by the method's scorer; hidden_states: the tower's hidden-state tuple over all views (embeddings first);
    n_views: V_i per image; sizes: (height, width) per image where the inputs carry it; geometry: per image
    the family's own description of it (e.g. OneVision's emitted layout, InternVL's tile grid), or None.
    """

    features: list[torch.Tensor]
    scores: list[torch.Tensor]
    hidden_states: tuple
    n_views: list[int]
    sizes: list[tuple[int, int]] | None = None
    geometry: list[Any] | None = None


class ImageBatch(NamedTuple):
    """What an adapter hands a patched call: per image, the LLM's visual tokens and the stock count.

    features: per image (T_i, D_llm); stock_counts: the stock placeholder tokens of each image in
    ``input_ids``; records: per image an ``ImageRecord`` (vision-side methods) or None (in-LLM methods).
    A family whose ``pack`` needs more per image returns a subclass carrying it (Qwen-VL's ``QwenImageBatch``).
    """

    features: list[torch.Tensor]
    stock_counts: list[int]
    records: list[ImageRecord] | None


class Compressed(NamedTuple):
    """``compress``'s result: per image the (T_i, D_llm) visual tokens and an ``ImageRecord``."""

    features: list[torch.Tensor]
    records: list[ImageRecord]


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class FamilyAdapter:
    """One model family's knowledge: classes, geometry, views, and the narrow place features become the LLM input.

    Subclasses set the class attributes and implement the methods marked abstract; the others have the
    default written here (like transformers' ``PreTrainedModel`` ``_supports_*`` flags). Instances hold no
    state: ``models.FAMILIES`` holds one of each.
    """

    #: short family name (CLI ``--family``, lmms-eval messages)
    family: ClassVar[str] = ""
    #: the family as messages and docs name it
    display_name: ClassVar[str] = ""
    #: transformers model classes this adapter patches (subclasses too)
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: transformers config classes it reads geometry from
    config_classes: ClassVar[tuple[str, ...]] = ()
    #: stock ``forward``/``generate`` arguments describing the images, consumed by the patched model
    vision_kwargs: ClassVar[tuple[str, ...]] = ("image_sizes",)
    #: whether the vision tower has a [CLS] token (``scorer="auto"`` is "cls" where it has)
    has_cls: ClassVar[bool] = True
    #: what ``scorer="auto"`` means on this family; None: "cls" with a [CLS] token, else "global_dissimilarity"
    default_scorer: ClassVar[str | None] = None
    #: per method name, the values its options left at "auto" take on this family, where the authors' code
    #: for this family differs from their LLaVA code (Qwen-VL: DART's ``topk_rule``, DivPrune's ``space``)
    auto_options: ClassVar[dict[str, dict[str, Any]]] = {}
    #: the tower, as named in error messages
    tower_name: ClassVar[str] = "this vision tower"
    #: registered methods that cannot run on this family, with the reason
    unsupported_methods: ClassVar[dict[str, str]] = {}
    #: the real checkpoints' Hub names, for messages and docs
    checkpoints: ClassVar[tuple[str, ...]] = ()

    # -- validation ------------------------------------------------------------------------------

    def check_config(self, config: Any) -> None:  # pragma: no cover - abstract
        """Raise a clear error unless ``config`` describes a model of this family the adapter supports."""
        raise NotImplementedError

    def check_model(self, model: nn.Module) -> None:
        """Raise a clear error unless ``model`` is a stock model of this family the adapter supports."""
        check_class(model, self.model_classes)
        self.check_config(model.config)

    def check_call(self, model: nn.Module, kwargs: dict) -> None:
        """Raise ValueError for call options compression cannot honour (e.g. video inputs), before any work."""

    def resolve(self, cfg: MethodConfig, config: Any) -> MethodConfig:
        """The config a method runs with on this family; ValueError (naming the method/option) for what cannot run.

        Default: refuse ``unsupported_methods`` and a scorer the tower cannot compute, give options left at
        "auto" the family's values (``auto_options``, ``default_scorer``); subclasses extend it.
        """
        if cfg.name in self.unsupported_methods:
            raise ValueError(
                f"method {cfg.name!r} does not run on {self.display_name}: {self.unsupported_methods[cfg.name]}"
            )
        names = cfg.option_names()
        auto = dict(self.auto_options.get(cfg.name, {}))
        if self.default_scorer is not None and "scorer" in names:
            auto.setdefault("scorer", self.default_scorer)
        chosen = {k: v for k, v in auto.items() if k in names and getattr(cfg, k) == "auto"}
        if chosen:
            cfg = dataclasses.replace(cfg, **chosen)
        if cfg.where == "vision":
            scoring.resolve_scorer(cfg.requires.scorer, self.has_cls, self.tower_name, self.default_scorer)
        return cfg

    def scorer(self, cfg: MethodConfig) -> str:
        """The concrete scorer ``cfg`` rates this family's tokens with ("auto" resolved the family's way)."""
        return scoring.resolve_scorer(cfg.requires.scorer, self.has_cls, self.tower_name, self.default_scorer)

    # -- the vision side -------------------------------------------------------------------------

    def stock_counts(self, model: nn.Module, pixel_values, vision_kwargs: dict, input_ids=None) -> list[int]:
        """Validate a call's image inputs (no tower run) and return each image's stock placeholder count."""
        raise NotImplementedError  # pragma: no cover - abstract

    def stock_features(self, model: nn.Module, pixel_values, vision_kwargs: dict, input_ids=None) -> list[torch.Tensor]:
        """Per image, the (T_i, D_llm) visual tokens stock feeds its LLM (the model's own vision path)."""
        raise NotImplementedError  # pragma: no cover - abstract

    #: the family file's ``compress(model, cfg, pixel_values, image_sizes=None, input_ids=None,
    #: attention_mask=None, **vision_kwargs) -> Compressed`` (set with ``staticmethod``)
    compress_images: ClassVar[Callable[..., Compressed]]

    def compress(
        self, model: nn.Module, cfg: MethodConfig, pixel_values, vision_kwargs: dict, input_ids=None,
        attention_mask=None,
    ) -> Compressed:  # fmt: skip
        """Per image, the (T_i, D_llm) visual tokens a vision-side method keeps and its ``ImageRecord``."""
        kwargs = {k: v for k, v in vision_kwargs.items() if k != "image_sizes"}
        image_sizes = vision_kwargs.get("image_sizes")
        return self.compress_images(model, cfg, pixel_values, image_sizes, input_ids, attention_mask, **kwargs)

    def prepare_images(
        self,
        model: nn.Module,
        cfg: MethodConfig,
        pixel_values: torch.Tensor,
        vision_kwargs: dict,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> ImageBatch:
        """A patched call's images: compressed features and records (vision-side methods) or stock features
        (in-LLM methods, which prune inside the language model), with the stock counts ``pack`` replaces."""
        counts = self.stock_counts(model, pixel_values, vision_kwargs, input_ids)
        if cfg.where == "llm":
            return ImageBatch(self.stock_features(model, pixel_values, vision_kwargs, input_ids), counts, None)
        feats, records = self.compress(model, cfg, pixel_values, vision_kwargs, input_ids, attention_mask)
        return ImageBatch(feats, counts, records)

    def geometry_context(
        self, cfg: MethodConfig, config: Any, image_size: tuple[int, int], processor: Any = None
    ) -> ImageContext:
        """An ``ImageContext`` holding the geometry of one image of (height, width), zero scores.

        processor: the model's processor (or its image processor, or a mapping of its settings), for families
        whose geometry follows a processor setting the model config does not hold (Qwen-VL's min/max pixels);
        the other families read everything from the config and ignore it.
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def token_count(
        self, cfg: MethodConfig, config: Any, image_size: tuple[int, int], processor: Any = None
    ) -> int | None:
        """Visual tokens the LLM receives for one image of (height, width) under ``cfg`` (already resolved), or
        None where that depends on the pixels. The method counts on the family's context."""
        return cfg.token_count(self.geometry_context(cfg, config, image_size, processor))

    def stock_token_count(self, config: Any, image_size: tuple[int, int], processor: Any = None) -> int:
        """Visual tokens stock feeds its LLM for one image of (height, width) (``processor``: as
        ``geometry_context``)."""
        raise NotImplementedError  # pragma: no cover - abstract

    # -- the language-model side -----------------------------------------------------------------

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack the in-LLM methods drive."""
        return model.model.language_model

    def pack(
        self,
        model: nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        features: list[torch.Tensor],
        stock_counts: list[int],
        labels: torch.Tensor | None = None,
        padding_side: str = "left",
        batch: ImageBatch | None = None,
    ) -> PackedInputs:
        """Splice each image's features into the prompt (``pack``); families with extra positional state
        (M-RoPE) override it. batch: the call's ``ImageBatch`` (as the family's ``prepare_images`` made it), for
        such families."""
        return pack(model, input_ids, attention_mask, features, stock_counts, labels=labels, padding_side=padding_side)

    def lm_call_context(self, model: nn.Module, packed: PackedInputs) -> contextlib.AbstractContextManager:
        """A context around the stock ``forward``/``generate`` on ``packed`` (entered before the in-LLM methods'
        hooks): none by default; Qwen-VL installs its M-RoPE positions and DeepStack inputs there."""
        return contextlib.nullcontext()

    # -- tools -----------------------------------------------------------------------------------

    def processor_kwargs(self, processor: Any, images: list) -> dict:
        """Extra call arguments the patched model needs beside ``processor(images=...)``'s output (none by default)."""
        return {}

    def view_pixels(self, pixel_values: torch.Tensor, rec: ImageRecord) -> tuple[torch.Tensor, torch.Tensor]:
        """(thumbnail (C, H, W), crops (n, C, H, W)) pixel views of the first image of ``pixel_values`` as the
        record's context orders them, for drawing. Default: the processor's (1, V, C, H, W), thumbnail first."""
        views = pixel_values[0, : 1 + rec.grid[0] * rec.grid[1]]
        return views[0], views[1:]

    def patch_masks(self, rec: ImageRecord, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept, content): (nph S, npw S) bool maps over the crop patches, for drawing (one token per patch)."""
        kept = core.crops_to_grid(rec.kept[1:].cpu(), rec.grid, rec.side)
        return kept, core.crops_to_grid(rec.valid.cpu(), rec.grid, rec.side)


# --------------------------------------------------------------------------------------------
# Input parsing
# --------------------------------------------------------------------------------------------


def check_pixel_values(pixel_values: Any) -> None:
    """TypeError naming ``pixel_values`` unless it is one floating-point tensor (the processor's output)."""
    if isinstance(pixel_values, (list, tuple)):
        raise TypeError(
            "pixel_values must be one float tensor as the processor returns it (return_tensors='pt'), got a "
            f"{type(pixel_values).__name__} of {len(pixel_values)} items; pass the processor's output unchanged"
        )
    if not isinstance(pixel_values, torch.Tensor) or not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a float tensor from the processor, got {type(pixel_values).__name__}")


def image_sizes_list(image_sizes: Any) -> list[tuple[int, int]]:
    """``image_sizes`` (the processor's (images, 2) (height, width) array) as positive int pairs; ValueError
    naming ``image_sizes`` otherwise."""
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


def check_channels(pixel_values: torch.Tensor, channels: int) -> None:
    """ValueError naming ``pixel_values`` unless its channel axis (dim -3) holds ``channels``."""
    if pixel_values.dim() >= 3 and pixel_values.shape[-3] != channels:
        raise ValueError(
            f"pixel_values must have {channels} channels (vision_config.num_channels) on dim -3, got shape "
            f"{tuple(pixel_values.shape)}; pass the processor's output unchanged"
        )


def check_class(model: nn.Module, supported: tuple[str, ...]) -> None:
    """Raise TypeError naming the supported classes unless ``model`` is (a subclass of) one of them."""
    if not {c.__name__ for c in type(model).__mro__}.intersection(supported):
        raise TypeError(f"model must be one of ({', '.join(supported)}) from transformers, got {type(model).__name__}")


def flatten_views(pixel_values: torch.Tensor, n_views: list[int], image_size: int, hint: str = "") -> torch.Tensor:
    """(sum V_i, C, H, W) views of every image from the processor's padded (B, V_max, C, H, W) or flat tensor.

    n_views: views each image needs (from its size); image_size: pixels per side of a view.
    hint: what else must come from the same processor call (e.g. " (and batch_num_images)").
    Raises ValueError naming the mismatch before any work.
    """
    if pixel_values.dim() == 5:
        if pixel_values.shape[0] != len(n_views):
            raise ValueError(
                f"pixel_values holds {pixel_values.shape[0]} images but image_sizes holds {len(n_views)}; "
                "pass both from the same processor call"
            )
        if pixel_values.shape[1] < max(n_views):
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} views per image but image_sizes needs up to "
                f"{max(n_views)}; pass both{hint} from the same processor call"
            )
        pixel_values = torch.cat([pv[:v] for pv, v in zip(pixel_values, n_views)], dim=0)
    elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(n_views):
        raise ValueError(
            f"pixel_values must be (images, views, C, H, W) or (sum of views, C, H, W) with {sum(n_views)} "
            f"views for these image_sizes, got shape {tuple(pixel_values.shape)}; pass both from the same "
            "processor call"
        )
    if pixel_values.shape[-1] != image_size or pixel_values.shape[-2] != image_size:
        raise ValueError(
            f"pixel_values views must be {image_size}x{image_size} (vision_config.image_size), "
            f"got {tuple(pixel_values.shape[-2:])}"
        )
    return pixel_values


def text_embeddings(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, counts: list[int]
) -> list[torch.Tensor | None]:
    """Per image, (M_i, D_llm) float32 input embeddings of the text tokens of the prompt row holding it.

    counts: stock placeholder tokens of each image, images in order (as ``pack`` consumes them).
    Text tokens are the row's attended tokens that are not image placeholders (chat template
    included). Returns None per image when the placeholders do not add up (``pack`` then raises).
    """
    is_img = input_ids == model.config.image_token_id  # (B, L)
    keep = torch.ones_like(is_img) if attention_mask is None else attention_mask.bool()
    row_ends = torch.cumsum((is_img & keep).sum(1), 0).tolist()  # placeholders up to each row's end
    if not row_ends or row_ends[-1] != sum(counts):
        return [None] * len(counts)
    embed = model.get_input_embeddings()
    out, start = [], 0
    for c in counts:  # loop over images, not tokens
        row = next(b for b, end in enumerate(row_ends) if start < end)
        with torch.no_grad():
            out.append(embed(input_ids[row][keep[row] & ~is_img[row]]).float())  # (M_i, D)
        start += c
    return out


@dataclass
class PackedInputs:
    """A shortened batch ready for the language model."""

    inputs_embeds: torch.Tensor  # (B, L', D)
    attention_mask: torch.Tensor  # (B, L') long
    position_ids: torch.Tensor  # (B, L') long
    labels: torch.Tensor | None  # (B, L') or None
    image_spans: list[list[tuple[int, int]]]  # per sample, [start, end) of every image's tokens


def _check_pack_inputs(input_ids, attention_mask, labels, stock_counts, image_token_id) -> torch.Tensor:
    """The attention mask (ones when None), after checking shapes and that the placeholders add up."""
    if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    placed = int((input_ids == image_token_id).sum())
    if placed != sum(stock_counts):
        raise ValueError(
            f"input_ids hold {placed} image placeholder tokens but the images need {sum(stock_counts)} "
            f"({stock_counts}); pass input_ids, pixel_values and image_sizes from the same processor call"
        )
    return attention_mask


def image_blocks(
    is_img: torch.Tensor, keep: torch.Tensor, stock_counts: list[int], first: int
) -> list[tuple[int, int, int]]:
    """(image index, start, end) of every image block in one prompt row, images from ``first`` on.

    is_img, keep: (L,) bool placeholders and attended tokens of the row; each block is the next
    ``stock_counts[i]`` consecutive placeholders. ValueError naming the mismatch otherwise.
    """
    pos = torch.nonzero(is_img & keep).squeeze(1).tolist()
    if len(pos) != int(is_img.sum()):
        raise ValueError("image placeholder tokens must not be masked out by attention_mask")
    blocks, used, img = [], 0, first
    while used < len(pos):  # loop over the row's images, not its tokens
        if img >= len(stock_counts):
            raise ValueError("input_ids hold more image placeholder blocks than there are images")
        count = stock_counts[img]
        start = pos[used]
        end = pos[used + count - 1] + 1 if used + count - 1 < len(pos) else None
        if end is None or end - start != count:
            raise ValueError(
                f"image {img} needs {count} consecutive placeholder tokens in input_ids; "
                "pass input_ids, pixel_values and image_sizes from the same processor call"
            )
        blocks.append((img, start, end))
        used, img = used + count, img + 1
    return blocks


def _pad_rows(rows, row_labels, spans, embeds, labels, padding_side, ignore_index) -> PackedInputs:
    """Right- or left-pad the spliced rows into one batch; positions count the attended tokens."""
    bsz, max_len, d = len(rows), max(r.shape[0] for r in rows), embeds.shape[-1]
    out = embeds.new_zeros(bsz, max_len, d)
    mask = torch.zeros(bsz, max_len, dtype=torch.long, device=embeds.device)
    new_labels = None if labels is None else labels.new_full((bsz, max_len), ignore_index)
    for b, r in enumerate(rows):
        n = r.shape[0]
        sl = slice(max_len - n, max_len) if padding_side == "left" else slice(0, n)
        out[b, sl] = r
        mask[b, sl] = 1
        if labels is not None:
            new_labels[b, sl] = row_labels[b]
        if padding_side == "left":
            spans[b] = [(s + max_len - n, e + max_len - n) for s, e in spans[b]]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return PackedInputs(out, mask, position_ids, new_labels, spans)


def pack(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_features: list[torch.Tensor],
    stock_counts: list[int],
    labels: torch.Tensor | None = None,
    padding_side: str = "left",
    ignore_index: int = -100,
) -> PackedInputs:
    """Replace each image's block of placeholder tokens by its (shorter) compressed features.

    input_ids: (B, L) with ``stock_counts[i]`` placeholder tokens for image i, images in order.
    """
    is_img = input_ids == model.config.image_token_id  # (B, L)
    attention_mask = _check_pack_inputs(input_ids, attention_mask, labels, stock_counts, model.config.image_token_id)
    embeds = model.get_input_embeddings()(input_ids)
    rows, row_labels, spans, next_image = [], [], [], 0
    for b in range(input_ids.shape[0]):  # loop over rows and their images, never tokens
        keep = attention_mask[b].bool()
        text_pos = torch.nonzero(keep).squeeze(1)
        pieces, lab, row_spans, cursor, length = [], [], [], 0, 0
        for img, start, end in image_blocks(is_img[b], keep, stock_counts, next_image):
            seg = text_pos[(text_pos >= cursor) & (text_pos < start)]
            feat = image_features[img].to(embeds.device, embeds.dtype)
            pieces += [embeds[b, seg], feat]
            if labels is not None:
                lab += [labels[b, seg], labels.new_full((feat.shape[0],), ignore_index)]
            length += seg.numel()
            row_spans.append((length, length + feat.shape[0]))
            length += feat.shape[0]
            cursor = end
        next_image += len(row_spans)
        seg = text_pos[text_pos >= cursor]
        pieces.append(embeds[b, seg])
        rows.append(torch.cat(pieces, dim=0))
        if labels is not None:
            row_labels.append(torch.cat([*lab, labels[b, seg]], dim=0))
        spans.append(row_spans)
    if next_image != len(stock_counts):
        raise ValueError(f"{len(stock_counts)} images were given but input_ids place only {next_image}")
    empty = [b for b, r in enumerate(rows) if r.shape[0] == 0]
    if empty:
        raise ValueError(
            f"row(s) {empty} of the batch would reach the language model with no token at all: their prompt is "
            "only image placeholders and the method keeps none of the image's tokens at this retention_ratio; "
            "raise retention_ratio or put text in the prompt"
        )
    return _pad_rows(rows, row_labels, spans, embeds, labels, padding_side, ignore_index)
