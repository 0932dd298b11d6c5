"""What every method shares: the per-image context it reads, the selection it returns, validation."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .. import core


@dataclass
class ImageContext:
    """Everything a vision-side method may look at for one image.

    scores: (1 + n, N) float32 [CLS] importance of every token of every view; row 0 is the thumbnail.
    side:   S, tokens per side of one view (N = S * S).
    grid:   (nph, npw) crops per column / per row.
    valid:  (n, N) bool, crop tokens that survive LLaVA-NeXT's unpadding.
    box:    (top, bottom, left, right) grid-space bounds of ``valid``, or None; it tells the rows of an
            image so thin that no column survives, which still get stock's newlines.
    image_index: position of the image in the batch (seeds the random baseline).

    Optional inputs, filled by the adapter only when the method lists them in ``needs`` (so a
    method that ranks by [CLS] scores alone pays nothing for them):

    features: (1 + n, N, D_llm) projected visual features of every view (``"features"``).
    newline:  (D_llm,) the model's image-newline embedding (given with ``"features"``).
    hidden:   (1 + n, 1 + N, D_vis) vision hidden states of the feature layer, [CLS] first; the
              projector of the model turns rows of it into LLM tokens (``"hidden"``).
    keys:     (1 + n, 1 + N, d_head) keys of the score layer averaged over heads, [CLS] first (``"keys"``).
    text:     (M, D_llm) the language model's input embeddings of the prompt's text tokens, M >= 0 (``"text"``).

    Set by adapters whose family differs from LLaVA-NeXT (None keeps LLaVA-NeXT's rules):

    region_weights: (n, N) float64 area of each thumbnail token over each crop's region
              (``core.crop_region_weights``), for grids that do not divide the thumbnail's side.
    stock_order: (T,) long, the family's stock visual sequence as indices into ``concat(views.flatten(0, 1))``
              (``stock_sequence`` then ignores LLaVA-NeXT's layout and newline).
    """

    scores: torch.Tensor
    side: int
    grid: tuple[int, int]
    valid: torch.Tensor
    box: tuple[int, int, int, int] | None = None
    image_index: int = 0
    features: torch.Tensor | None = None
    newline: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text: torch.Tensor | None = None
    region_weights: torch.Tensor | None = None
    stock_order: torch.Tensor | None = None

    @property
    def thumbnail(self) -> torch.Tensor:
        """(N,) thumbnail scores."""
        return self.scores[0]

    @property
    def crops(self) -> torch.Tensor:
        """(n, N) crop scores."""
        return self.scores[1:]


@dataclass
class Selection:
    """What a vision-side method keeps of one image.

    thumb_keep:  (k0,) long, thumbnail token indices in the order they are emitted.
    crop_keep:   (n, N) bool, kept crop tokens at their true positions.
    crop_ratios: (n,) float64, retention ratio each crop was given.
    extra:       optional (M, D_vis) vision-space tokens (merged or [CLS] tokens) that the adapter
                 projects and appends to the source; ``order`` addresses row m as ``(1 + n) * N + 1 + m``.
    order:       optional (T,) long, the emission order when the method decides it itself (see ``order``).
    """

    thumb_keep: torch.Tensor
    crop_keep: torch.Tensor
    crop_ratios: torch.Tensor
    extra: torch.Tensor | None = None
    order: torch.Tensor | None = None


@dataclass
class Stage:
    """What a method decided at one pruning layer, row by row (lengths may differ per row)."""

    hidden: list[torch.Tensor]  # per row (L_b, D) new hidden states
    positions: list[torch.Tensor]  # per row (L_b,) rotary positions
    visual: list[torch.Tensor]  # per row (L_b,) bool, which entries are (still) visual tokens


@dataclass
class PruneContext:
    """What a method sees at a pruning layer.

    hidden: (B, L, D) input of layer ``layer_idx`` on the current sequence;
    key_mask: (B, L) bool real (non-padding) tokens; positions: (B, L) rotary positions;
    visual: (B, L) bool visual tokens;
    probs: callable(query positions (B, Q)) -> (B, H, Q, L) attention of layer ``layer_idx - 1``;
    n_visual_full: (B,) visual tokens of each row before any pruning;
    prompt: the language model's input at prefill, (embeds (B, L0, D), key mask (B, L0), visual (B, L0),
        positions (B, L0)), before any pruning;
    num_layers: decoder layers of the language model;
    keys: callable() -> (B, Hkv, L, hd) float32 rotary-embedded keys of layer ``layer_idx - 1`` on the current
        sequence (its own ``k_proj`` output, captured as it ran), or None;
    norm: the language model's final norm (applied to ``hidden`` by methods that compare normed states), or None.
    """

    layer_idx: int
    stage: int
    hidden: torch.Tensor
    key_mask: torch.Tensor
    positions: torch.Tensor
    visual: torch.Tensor
    probs: Callable[[torch.Tensor], torch.Tensor]
    n_visual_full: torch.Tensor
    prompt: tuple | None = None
    num_layers: int = 0
    keys: Callable[[], torch.Tensor] | None = None
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None


def stock_sequence(ctx: ImageContext, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stock LLaVA-NeXT's visual sequence of one image, for methods that select over it.

    returns: (order (T,) long indices into ``concat(views.flatten(0, 1), newline)`` in stock order,
        source (V N + 1, D) the detached projected features with the newline last).
    """
    if ctx.features is None or ctx.newline is None:
        raise ValueError(f"{method} needs the projected features (ImageContext.features/newline)")
    feats = ctx.features.detach()  # (V, N, D)
    dev, n_tok = feats.device, ctx.scores.shape[1]
    valid = ctx.valid.to(dev)
    with torch.no_grad():
        thumb = torch.arange(n_tok, device=dev)
        if ctx.stock_order is not None:  # the family's own stock sequence (e.g. InternVL: no newlines)
            order = ctx.stock_order.to(dev)  # (T,)
        else:
            order = core.assemble_order(thumb, valid, valid, ctx.grid, ctx.side, "spatial", ctx.box)  # (T,)
        source = torch.cat([feats.flatten(0, 1), ctx.newline.detach()[None].to(feats.dtype)])  # (V N + 1, D)
    return order, source


def selection_from_order(order: torch.Tensor, ctx: ImageContext) -> Selection:
    """The ``Selection`` of a method that decides its emission ``order`` (T,) itself."""
    v, n_tok = ctx.scores.shape
    kept = torch.zeros(v * n_tok, dtype=torch.bool, device=order.device)
    kept[order[order < v * n_tok]] = True
    kept = kept.view(v, n_tok)  # (V, N)
    ratios = (kept[1:].sum(1).double() / ctx.valid.to(kept.device).sum(1).clamp(min=1).double()).cpu()
    return Selection(order[order < n_tok], kept[1:], ratios, order=order)


def _fmt(values) -> str:
    return ", ".join(repr(v) for v in values)


def check_scorer(value: Any) -> None:
    """Raise ValueError naming ``scorer`` unless ``value`` is one of ``models.scoring.SCORER_CHOICES``."""
    from ..models.scoring import SCORER_CHOICES  # lazy: models imports methods

    check_choice("scorer", value, SCORER_CHOICES)


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of ({_fmt(allowed)}), got {value!r}")


def is_real(value: Any) -> bool:
    """Whether ``value`` is a real number: any ``numbers.Real`` (int, float, NumPy scalars such as
    ``np.float32``, ``Fraction``) or a 0-d real-valued tensor/array, but not a bool."""
    if isinstance(value, torch.Tensor):
        return value.ndim == 0 and (
            value.dtype.is_floating_point or not (value.dtype.is_complex or value.dtype == torch.bool)
        )
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and value.dtype.kind in "iuf"
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_number(
    name: str, value: Any, low: float, high: float, low_open: bool = True, high_open: bool = False
) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a finite real number in the interval."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    interval = f"{lo}{low}, {high}{hi}"
    if not is_real(value):
        raise TypeError(f"{name} must be a real number in {interval}, got {value!r}")
    v = float(value)
    ok = math.isfinite(v)
    ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
    if not ok:
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's frozen config. Subclasses add fields and implement ``select``.

    retention_ratio: R in (0, 1], share of visual tokens kept.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: "vision" prunes before the language model, "llm" inside it.
    where: ClassVar[str] = "vision"
    #: optional ``ImageContext`` inputs the method reads: "features", "hidden", "keys", "text".
    needs: ClassVar[frozenset[str]] = frozenset()
    paper: ClassVar[str] = ""

    retention_ratio: float = 0.25

    def __post_init__(self) -> None:
        check_number("retention_ratio", self.retention_ratio, 0.0, 1.0)
        object.__setattr__(self, "retention_ratio", float(self.retention_ratio))

    @classmethod
    def where_of(cls, options: dict[str, Any]) -> str:
        """Where a config built with these options prunes ("vision" or "llm"); a method whose option picks
        its form (DART's ``form``) overrides this, and its instances' ``where`` follows it."""
        return cls.where

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Names of the options this method accepts."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def select(self, ctx: ImageContext) -> Selection:  # pragma: no cover - abstract
        """Choose the tokens of one image."""
        raise NotImplementedError

    def check_model(self, model) -> None:
        """Method-specific checks against the model, run by ``apply`` before patching."""

    def order(self, sel: Selection, ctx: ImageContext) -> torch.Tensor:
        """Indices into ``concat(views.flatten(0, 1), newline, projected extra)`` of the tokens the LLM receives."""
        if sel.order is not None:
            return sel.order
        thumb = sel.thumb_keep
        if getattr(self, "thumbnail_order", "score") == "spatial":
            thumb = thumb.sort().values
        return core.assemble_order(thumb, sel.crop_keep, ctx.valid, ctx.grid, ctx.side, self.layout_name, ctx.box)

    @property
    def score_source(self) -> tuple[int | None, str]:
        """(vision layer, "logits" | "softmax") of the [CLS] attention this method ranks by.

        Layer None means the model's ``vision_feature_layer``; -1 is the last encoder layer.
        """
        return -1, getattr(self, "score", "logits")

    @property
    def unpad(self) -> bool:
        """Whether crop tokens in the processor's letterbox padding are removed before selection."""
        return True

    @property
    def layout_name(self) -> str:
        """Crop layout used to assemble the LLM input (see ``core.assemble_order``)."""
        return getattr(self, "layout", "authors")

    @property
    def unpad_rounding(self) -> int | None:
        """Unpadding rule: the authors truncate (``int``), stock transformers rounds to 7 digits first."""
        return None if self.layout_name == "authors" else 7


def check_concrete(cls: type[MethodConfig]) -> None:
    """Raise TypeError unless ``cls`` is a method that can run: it implements its side of the pipeline."""
    if cls.where == "llm":
        ok = callable(getattr(cls, "prune", None)) and callable(getattr(cls, "prune_layers", None))
    else:
        ok = cls.select is not MethodConfig.select
    if not ok:
        what = "prune and prune_layers" if cls.where == "llm" else "select"
        raise TypeError(
            f"method must be a registered name or a concrete method config such as GlobalCom2Config(...); "
            f"{cls.__name__} does not implement {what} (MethodConfig is the abstract base)"
        )
