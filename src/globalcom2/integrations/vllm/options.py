"""The ``globalcom2`` key of a vLLM model's ``hf_overrides``: parsed and validated once, without vLLM."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ...budget import num_image_tokens
from ...methods import MethodConfig, make_config
from .select import SERVABLE_NEEDS

ARCHITECTURE = "GlobalCom2LlavaNextForConditionalGeneration"
KEY = "globalcom2"


def method_config(
    hf_config: Any, scorers: tuple[str, ...] = ("auto", "cls"), probe: Callable[[MethodConfig], Any] | None = None
) -> MethodConfig:
    """The method config a served model runs with, from ``hf_config.globalcom2`` (a dict of ``apply`` options).

    ``{"method": name, **options}``; a missing key means ``{"method": "globalcom2"}`` with its defaults.
    A serving engine fixes each image's placeholder count from its size before the model runs, so:
    methods that prune inside the language model are refused, and for a method whose count depends on
    the pixels (GlobalCom² and ``random`` with a non-uniform allocation, the Table I crop-dropping
    variants) ``budget`` defaults to ``"exact"`` here; an explicit ``budget="authors"`` there fails with
    the library's error. Methods that read the prompt's text (``cdpruner``, ``dart``, ``composed`` with
    those selectors) are refused: vLLM embeds an image without its prompt. Raises the library's
    ValueError/TypeError, so a bad setting stops engine start. ``scorers``: the ``scorer`` values the
    family's vLLM model computes (LLaVA-NeXT: the [CLS] attention; the [CLS]-free towers others).
    ``probe(cfg)``: counts one image (raises where the count is not size-only); default: an image of
    ``vision_config.image_size`` x twice that (the towers with a fixed input side).
    """
    raw = getattr(hf_config, KEY, None)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise TypeError(f"hf_overrides[{KEY!r}] must be a dict of globalcom2 options, got {type(raw).__name__}")
    options = dict(raw)
    method = options.pop("method", "globalcom2")
    if not isinstance(method, str):
        raise TypeError(f"hf_overrides[{KEY!r}]['method'] must be a method name, got {method!r}")
    cfg = make_config(method, **options)
    if cfg.where == "llm":
        other = "embedding" in cfg.forms  # a method with a vision-side form (DART's form='embedding')
        raise ValueError(
            f"method {cfg.name!r} prunes inside the language model; the vLLM plugin serves the vision-side "
            "methods, whose token count vLLM can reserve from the image size"
            + (f" ({cfg.name}'s vision-side form is form='embedding')" if other else "")
        )
    unservable = sorted(set(cfg.needs) - SERVABLE_NEEDS)
    if unservable:
        what = f"method {cfg.name!r}" + (f" with selector={cfg.selector!r}" if cfg.name == "composed" else "")
        raise ValueError(
            f"{what} ranks visual tokens against the prompt's text embeddings ({', '.join(unservable)}); vLLM "
            "computes an image's embedding without its prompt (and reuses it across prompts), so the vLLM plugin "
            "cannot serve it. Use globalcom2.apply on the Hugging Face model, or a method that reads the image "
            "alone (globalcom2, fastervlm, visionzip, divprune, composed with those selectors)"
        )
    if cfg.requires.scorer not in scorers:
        what = "by their [CLS] attention" if scorers == ("auto", "cls") else f"with scorer {' / '.join(scorers)}"
        raise ValueError(
            f"scorer={cfg.requires.scorer!r}: the vLLM plugin for this model rates tokens {what} "
            f"(scorer {' or '.join(map(repr, scorers))}); the other scorers run on the Hugging Face path "
            "(globalcom2.apply)"
        )
    if "budget" in cfg.option_names() and "budget" not in options:
        cfg = make_config(cfg, budget="exact")
    if probe is not None:
        probe(cfg)  # raises where the count is not size-only
        return cfg
    side = hf_config.vision_config.image_size
    side = int(side[0] if isinstance(side, (list, tuple)) else side)
    num_image_tokens(hf_config, (side, 2 * side), cfg)  # raises where the count is not size-only
    return cfg


class CountCache:
    """Per-image token counts of one served model, remembered per image size.

    vLLM asks a processing info for the count of every image of every request, on the request's path to
    its first token. Parsing the options and counting cost milliseconds each (stock's count costs ~0.1 ms),
    so the parsed config is kept while the model config and its options are unchanged, and counts are
    remembered per (height, width), least recently used dropped first.
    """

    #: image sizes one served model remembers
    SIZE = 4096

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._cfg: MethodConfig | None = None
        self._counts: OrderedDict[tuple[int, int], int] = OrderedDict()

    def count(
        self, hf_config: Any, size: tuple[int, int], config_of: Callable[[Any], MethodConfig], processor: Any = None
    ) -> int:
        """``num_image_tokens(hf_config, size, config_of(hf_config), processor=processor)``, parsed once and
        remembered per size (``processor`` must be a function of ``size`` alone, or fixed)."""
        options = getattr(hf_config, KEY, None)
        if self._key is None or self._key[0] is not hf_config or self._key[1] != options:
            self._key, self._cfg = (hf_config, copy.deepcopy(options)), config_of(hf_config)
            self._counts = OrderedDict()
        k = self._counts.get(size)
        if k is None:
            k = self._counts[size] = num_image_tokens(hf_config, size, self._cfg, processor=processor)
            if len(self._counts) > self.SIZE:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(size)
        return k


def cached_count(
    info: Any, size: tuple[int, int], config_of: Callable[[Any], MethodConfig], processor: Any = None
) -> int:
    """The count of an image of ``size`` for the model a vLLM processing info ``info`` serves (``CountCache``)."""
    cache = info.__dict__.get("_globalcom2_counts")
    if cache is None:
        cache = info._globalcom2_counts = CountCache()
    return cache.count(info.get_hf_config(), (int(size[0]), int(size[1])), config_of, processor)
