"""A replicated copy of the scoring layer's ``layer_norm1`` / ``q_proj`` / ``k_proj`` (CLIP and SigLIP towers).

vLLM fuses the tower's q/k/v into one ``QKVParallelLinear`` that tensor parallelism shards by heads, and
builds the tower only up to ``vision_feature_layer``; the scores are recomputed the way the HF path
recomputes them (``models.llava_next`` / ``models.scoring``), from a full, unsharded copy of the scoring
layer's weights, which ``ScoreWeights.keep`` takes from the checkpoint as vLLM's loader streams it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from types import SimpleNamespace

import torch
from torch import nn

#: checkpoint names of the tensors the copy holds (llava-hf layout, as ``save_vllm_checkpoint`` writes it)
SCORE_WEIGHT = re.compile(
    r"(?:^|\.)vision_tower\.vision_model\.encoder\.layers\.(\d+)\.(layer_norm1|self_attn\.q_proj|self_attn\.k_proj)"
    r"\.(weight|bias)$"
)


class _ScoreAttention(nn.Module):
    """The q/k projections of one attention layer (enough for its [CLS] row, or for a whole attention map)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.num_heads = heads
        self.scale = (hidden // heads) ** -0.5
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)


class ScoreLayer(nn.Module):
    """``layer_norm1`` and ``self_attn.{q,k}_proj`` of the tower layer whose attention ranks tokens."""

    def __init__(self, hidden: int, heads: int, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = _ScoreAttention(hidden, heads)


def score_tower(layer: ScoreLayer, vision_config) -> SimpleNamespace:
    """A stand-in for the HF tower that the HF path's scorers read (``encoder.layers[i]``, ``config``):
    every layer slot is ``layer`` (the scorers only touch the scoring layer's slot)."""
    return SimpleNamespace(
        encoder=SimpleNamespace(layers=[layer] * vision_config.num_hidden_layers), config=vision_config
    )


def score_positions(config, score_layer: int | None, method: str) -> tuple[int, int]:
    """(feature_pos, score_pos): the hidden-state index of the features, the encoder layer whose attention
    rates the tokens. ValueError where that layer is not among the layers vLLM builds."""
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(f"the vLLM plugin needs one int vision_feature_layer, got {config.vision_feature_layer!r}")
    n_layers = config.vision_config.num_hidden_layers
    feature_pos = config.vision_feature_layer % (n_layers + 1)  # index into (embeddings, layer 1..L) outputs
    layer = config.vision_feature_layer if score_layer is None else score_layer
    score_hs = layer % (n_layers + 1)  # as the HF path reads it: index into (embeddings, layer 1..L) outputs
    if score_hs == 0:
        raise ValueError(
            f"vision_feature_layer {layer} selects the embeddings, which no encoder layer's attention "
            f"produced; method {method!r} needs a layer index other than 0 or {-n_layers - 1}"
        )
    if score_hs - 1 > feature_pos:
        raise ValueError(
            f"method {method!r} scores with vision layer {layer}, whose input is computed after "
            f"vision_feature_layer={config.vision_feature_layer}; the vLLM plugin needs the score layer's input "
            "among the layers vLLM builds"
        )
    return feature_pos, score_hs - 1


class ScoreWeights:
    """Copies the scoring layer's tensors into a ``ScoreLayer`` (or any module holding them) while vLLM's loader
    reads the checkpoint.

    pattern: a checkpoint name's (layer index, sub-module, weight|bias) groups; layer: how the error calls the
    layer; where: where the checkpoint was expected to hold them.
    """

    def __init__(
        self, layer: nn.Module, position: int, pattern: re.Pattern = SCORE_WEIGHT, what: str = "vision layer",
        where: str = "under vision_tower.vision_model.encoder.layers.*, the llava-hf layout",
    ) -> None:  # fmt: skip
        self.params = dict(layer.named_parameters())
        self.position = position
        self.pattern, self.what, self.where = pattern, what, where
        self.seen: set[str] = set()

    def keep(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """``weights`` unchanged, copying those of the scoring layer on the way."""
        for name, w in weights:
            m = self.pattern.search(name)
            if m and int(m.group(1)) == self.position:
                key = f"{m.group(2)}.{m.group(3)}"
                if key in self.params:  # e.g. a bias the copy's norm does not have
                    with torch.no_grad():
                        self.params[key].copy_(w.to(self.params[key].dtype))
                    self.seen.add(key)
            yield name, w

    def check(self, prefix: str = "globalcom2_score") -> set[str]:
        """The copy's parameter names (for vLLM's loaded-weights check); ValueError if the checkpoint lacked any."""
        missing = sorted(set(self.params) - self.seen)
        if missing:
            raise ValueError(
                f"the checkpoint lacks {self.what} {self.position}'s {', '.join(missing)}, which the token "
                f"scores need (expected {self.where})"
            )
        return {f"{prefix}.{k}" for k in self.params}
