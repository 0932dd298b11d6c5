"""What every method shares: the declared interfaces, the requirements record, validation helpers.

Two kinds of method, two base classes (a new method subclasses one and is registered in
``methods/__init__.py``):

* ``VisionMethod``: prunes before the language model. It declares what it needs from the model
  (``requires``: score layer, score kind, scorer, unpadding, layout, optional inputs), picks the
  tokens of one image (``select``), lays them out (``order``), and states its token count for an
  image size when that count does not depend on the pixels (``token_count``).
* ``LLMMethod``: prunes inside the language model (``prune_layers``, ``stage_tokens``, ``prune``),
  driven by ``models.llm_pruning``.

The per-image context and the selection are pure records in ``core.context``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .. import core
from ..core.context import ImageContext, PruneContext, Selection, Stage
from .checks import check_choice, check_number, check_scorer, is_real
from .sequence import selection_from_order, stock_length, stock_order, stock_sequence

__all__ = [
    "ImageContext",
    "PruneContext",
    "Selection",
    "Stage",
    "Requirements",
    "MethodConfig",
    "VisionMethod",
    "LLMMethod",
    "ViewSelector",
    "TRANSFORMERS_UNPAD_DIGITS",
    "check_choice",
    "check_concrete",
    "check_number",
    "check_pruning_layer",
    "check_scorer",
    "is_real",
    "selection_from_order",
    "stock_length",
    "stock_order",
    "stock_sequence",
]

#: transformers' ``unpad_image`` rounds the scaled size to 7 digits before truncating (the authors truncate)
TRANSFORMERS_UNPAD_DIGITS = 7
#: what ``Requirements.needs`` may list: optional ``ImageContext`` inputs the adapter fills on request
NEEDS = frozenset({"features", "hidden", "keys", "text", "tower"})


@dataclass(frozen=True)
class Requirements:
    """What a vision-side method needs from the model adapter, declared once per config.

    score_layer: hidden-state index whose producing layer's attention rates the tokens, like
        ``vision_feature_layer`` (-1: the last layer's output; None: the model's feature layer).
    score: "logits" (head-averaged pre-softmax [CLS] row) or "softmax" (probabilities).
    scorer: "auto", "cls", "attention_received" or "global_dissimilarity" (``core.scoring``).
    unpad: whether crop tokens in the processor's letterbox padding are removed before selection.
    unpad_rounding: 7 (default) rounds to 7 digits first like transformers' ``unpad_image``; None truncates like
        the GlobalCom² authors' code.
    layout: crop layout of the emitted sequence (``core.assemble_order``): "authors", "spatial", "flat".
    thumbnail_order: "score" (kept thumbnail tokens best first) or "spatial" (raster order).
    needs: optional ``ImageContext`` inputs: "features", "hidden", "keys", "text", "tower" (a family fills the
        ones it can; "tower" only where it defines ``ImageContext.tower_features``).
    """

    score_layer: int | None = -1
    score: str = "logits"
    scorer: str = "auto"
    unpad: bool = True
    unpad_rounding: int | None = TRANSFORMERS_UNPAD_DIGITS
    layout: str = "authors"
    thumbnail_order: str = "score"
    needs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's frozen config (abstract: subclass ``VisionMethod`` or ``LLMMethod``).

    retention_ratio: R in (0, 1], share of visual tokens kept.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: "vision" prunes before the language model, "llm" inside it (fixed per class)
    where: ClassVar[str] = ""
    #: configs of the other forms of this method by the value of its ``form`` option (DART), else empty
    forms: ClassVar[dict[str, type[MethodConfig]]] = {}

    retention_ratio: float = 0.25

    def __post_init__(self) -> None:
        check_number("retention_ratio", self.retention_ratio, 0.0, 1.0)
        object.__setattr__(self, "retention_ratio", float(self.retention_ratio))

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """Names of the options this method accepts."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def options(self) -> dict[str, Any]:
        """This config's options as a dict (``make_config(self.name, **cfg.options())`` rebuilds it)."""
        return {name: getattr(self, name) for name in self.option_names()}

    def check_model(self, model) -> None:
        """Method-specific checks against the model, run by ``apply`` before patching."""

    @property
    def requires(self) -> Requirements:
        """What the method needs from the model adapter (``Requirements``)."""
        return Requirements()

    @property
    def needs(self) -> frozenset[str]:
        """Shorthand for ``requires.needs``."""
        return self.requires.needs


@dataclass(frozen=True)
class VisionMethod(MethodConfig):
    """A method that picks each image's visual tokens before the language model runs."""

    where: ClassVar[str] = "vision"

    def select(self, ctx: ImageContext) -> Selection:  # pragma: no cover - abstract
        """Choose the tokens of one image."""
        raise NotImplementedError

    def order(self, sel: Selection, ctx: ImageContext) -> torch.Tensor:
        """(T,) indices into ``concat(views.flatten(0, 1), newline, projected extra)`` of the tokens the LLM
        receives. Families without newline tokens (``ctx.newlines`` False) never get the newline index, and
        a global view the model does not have (``ctx.thumbnail_emitted`` False) none of its tokens."""
        if sel.order is not None:
            order = sel.order
        else:
            req = self.requires
            thumb = sel.thumb_keep.sort().values if req.thumbnail_order == "spatial" else sel.thumb_keep
            order = core.assemble_order(thumb, sel.crop_keep, ctx.valid, ctx.grid, ctx.side, req.layout, ctx.box)
        if not ctx.newlines:
            order = order[order != ctx.scores.numel()]
        if not ctx.thumbnail_emitted:
            order = order[order >= ctx.scores.shape[1]]
        return order

    def content_dependence(self) -> str | None:
        """Why this config's token count depends on the image's pixels (with the option that fixes it), or None."""
        return None

    def size_budget(self, ctx: ImageContext) -> tuple[int, torch.Tensor] | None:
        """(thumbnail tokens, (n,) long crop tokens) every image of ``ctx``'s geometry keeps, for methods whose
        emission is ``order`` of a thumbnail/crop split; None for methods that count otherwise."""
        return None

    def token_count(self, ctx: ImageContext) -> int | None:
        """Visual tokens the LLM receives for any image of ``ctx``'s geometry (read from the geometry only,
        never the scores), or None when the count depends on the pixels (``content_dependence`` says why)."""
        if self.content_dependence() is not None:
            return None
        budget = self.size_budget(ctx)
        if budget is None:  # pragma: no cover - a method must count one way or the other
            raise NotImplementedError(f"{type(self).__name__} declares neither size_budget nor token_count")
        return int(self.order(core.canonical_selection(ctx, *budget), ctx).numel())


@dataclass(frozen=True)
class LLMMethod(MethodConfig):
    """A method that shortens the sequence inside the language model (``models.llm_pruning`` drives it)."""

    where: ClassVar[str] = "llm"

    def prune_layers(self, num_layers: int) -> tuple[int, ...]:  # pragma: no cover - abstract
        """Decoder layers whose input is shortened."""
        raise NotImplementedError

    def stage_tokens(self, n_visual: int, num_layers: int) -> tuple[int, ...]:  # pragma: no cover - abstract
        """Visual tokens from each pruning layer on, for a row entering with ``n_visual`` of them."""
        raise NotImplementedError

    def prune(self, ctx: PruneContext) -> Stage:  # pragma: no cover - abstract
        """What each row keeps at one pruning layer."""
        raise NotImplementedError


def check_pruning_layer(k: int, model) -> None:
    """ValueError naming ``k`` unless decoder layer K (pruned using layer K-1) exists in ``model``'s language model."""
    n = model.config.text_config.num_hidden_layers
    if k >= n:
        raise ValueError(f"k must be in [1, {n - 1}] for a language model with {n} layers, got {k}")


def check_concrete(cls: type[MethodConfig]) -> None:
    """Raise TypeError unless ``cls`` is a method that can run: it implements its side of the pipeline."""
    if issubclass(cls, LLMMethod):
        ok = cls.prune is not LLMMethod.prune and cls.prune_layers is not LLMMethod.prune_layers
        what = "prune and prune_layers"
    else:
        ok = issubclass(cls, VisionMethod) and cls.select is not VisionMethod.select
        what = "select"
    if not ok:
        raise TypeError(
            f"method must be a registered name or a concrete method config such as GlobalCom2Config(...); "
            f"{cls.__name__} does not implement {what} (MethodConfig is the abstract base)"
        )


class ViewSelector:
    """One method's rule for filling a given count inside one view; ``composed`` runs it view by view.

    A selector belongs to a standalone method (``method``): its own options are fields of that config,
    with that config's defaults and validation, so the composition never copies them. ``pick`` returns
    the chosen candidate positions of one view (in the selector's order) and optional vision-space tokens
    of its own (VisionZip's merged ones) for the adapter to project.
    """

    name: ClassVar[str] = ""
    #: the standalone config whose fields and defaults the selector's options are
    method: ClassVar[type[VisionMethod]]
    #: the selector's own options (fields of ``method``)
    options: ClassVar[tuple[str, ...]] = ()
    #: optional ``ImageContext`` inputs the selector reads
    needs: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The selector's options with the standalone method's defaults."""
        fields = {f.name: f.default for f in dataclasses.fields(cls.method)}
        return {name: fields[name] for name in cls.options}

    def prepare(self, ctx: ImageContext, options: dict[str, Any]) -> dict[str, Any]:
        """Per-image state shared by the views (e.g. CDPruner's relevance, normalised over the image)."""
        return {}

    def projected(self, ctx: ImageContext) -> torch.Tensor:
        """(V, N, D) the image's detached projected features; ValueError naming the selector without them."""
        if ctx.features is None:
            raise ValueError(f"selector {self.name!r} needs the projected features (ImageContext.features)")
        return ctx.features.detach()

    def pick(
        self, ctx: ImageContext, state: dict[str, Any], view: int, pos: torch.Tensor, k: int, options: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover - abstract
        """(chosen (k',) long positions of ``view`` among candidates ``pos`` (M,), optional (C, D_vis) tokens)."""
        raise NotImplementedError
