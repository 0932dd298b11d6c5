"""CLIP/SigLIP-style vision towers (LLaVA-NeXT, LLaVA-OneVision): layers, feature-layer index, token scores.

Scores are recomputed from the tower's hidden states (the layer norm and q/k projections of one layer,
``core.scoring``), so any attention kernel works and no ``output_attentions`` is needed. Every layer is
named the way ``vision_feature_layer`` names it, an index into the hidden states (``core.layers.HiddenIndex``):
the scores of index i are the attention of the layer whose output is ``hidden_states[i]``, and so are its keys.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from ..core import scoring
from ..core.layers import HiddenIndex


def encoder_layers(tower: nn.Module) -> nn.ModuleList | None:
    """The tower's encoder layers (``vision_model.encoder.layers`` or ``encoder.layers``), or None."""
    for path in ("vision_model.encoder.layers", "encoder.layers"):
        obj = tower
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    return None


def check_encoder_tower(tower: nn.Module, kind: str, extra: str = "") -> None:
    """TypeError unless ``tower``'s layers have what the scores are recomputed from (layer_norm1, q/k projections)."""
    layers = encoder_layers(tower)
    last = layers[-1] if layers is not None and len(layers) else None
    attn = getattr(last, "self_attn", None)
    if last is None or not all(hasattr(m, n) for m, n in ((last, "layer_norm1"), (attn, "q_proj"), (attn, "k_proj"))):
        raise TypeError(
            f"the vision tower must be {kind} (layers with layer_norm1 and self_attn.q_proj/k_proj){extra}; "
            f"got {type(tower).__name__}"
        )


def feature_layer(configured: Any, layer: Any, num_layers: int) -> int | list[int]:
    """The validated ``vision_feature_layer`` (call-time ``layer`` or the ``configured`` one): an index into the
    tower's ``num_layers + 1`` hidden states, or a list of such indices when the projector takes several layers."""
    layer = configured if layer is None else layer
    n = num_layers
    allowed = f"an int in [{-(n + 1)}, {n}] (an index into the vision tower's {n + 1} hidden states)"

    def ok(x) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool) and -(num_layers + 1) <= int(x) <= num_layers

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


def features_of(hidden_states: tuple, layer: int | list[int]) -> torch.Tensor:
    """(V, T, D) hidden states of the feature layer(s) (several layers concatenated on the last axis)."""
    if isinstance(layer, int):
        return hidden_states[layer]
    return torch.cat([hidden_states[i] for i in layer], dim=-1)


def num_heads(tower: nn.Module, attn: nn.Module) -> int:
    """Attention heads of one tower layer."""
    return getattr(attn, "num_heads", None) or tower.config.num_attention_heads


def _layer_input(layers, hidden_states: tuple, index: HiddenIndex) -> tuple[nn.Module, torch.Tensor]:
    """(encoder layer producing ``hidden_states[index]``, its normed input (V, T, D))."""
    lyr = layers[index.layer]
    return lyr, lyr.layer_norm1(hidden_states[index.layer_input])


def tower_scores(
    tower: nn.Module, hidden_states: tuple, scorer: str, score: str, layer: int, has_cls: bool = True
) -> torch.Tensor:
    """(V, N) float32 rating of every patch token by ``scorer`` (a concrete ``core.scoring.SCORERS`` name).

    layer: hidden-state index like ``vision_feature_layer``; the attention of the layer producing it.
    "cls" is its [CLS] row, "attention_received" its head-averaged probabilities received, both from the
    recomputed queries/keys; "global_dissimilarity" reads its output tokens (projects nothing).
    """
    layers = encoder_layers(tower)
    index = HiddenIndex.of(layer, len(layers))
    if scorer == "global_dissimilarity":
        tokens = hidden_states[index.index]
        return scoring.global_dissimilarity(tokens[:, 1:] if has_cls else tokens)
    lyr, x = _layer_input(layers, hidden_states, index)  # x: (V, T, D)
    attn = lyr.self_attn
    heads = num_heads(tower, attn)
    scale = getattr(attn, "scale", (x.shape[-1] // heads) ** -0.5)
    if scorer == "cls":
        return scoring.cls_scores_from_input(x, attn.q_proj, attn.k_proj, heads, scale, score)
    q = scoring.f32_linear(attn.q_proj, x) * scale
    k = scoring.f32_linear(attn.k_proj, x)
    return scoring.view_scores(scorer, q, k, None, heads, has_cls, score)


def layer_keys(tower: nn.Module, hidden_states: tuple, layer: int) -> torch.Tensor:
    """(V, T, d_head) float32 keys averaged over heads of the layer producing ``hidden_states[layer]``.

    The same layer ``tower_scores(..., layer)`` rates by (one ``HiddenIndex``); VisionZip's merge metric.
    """
    layers = encoder_layers(tower)
    lyr, x = _layer_input(layers, hidden_states, HiddenIndex.of(layer, len(layers)))
    keys = scoring.f32_linear(lyr.self_attn.k_proj, x)  # (V, T, D)
    return scoring.head_mean_keys(keys, num_heads(tower, lyr.self_attn))
