"""One way to name a vision layer: an index into the tower's hidden states, as ``vision_feature_layer`` does.

A tower with L encoder layers returns L + 1 hidden states: ``hidden_states[0]`` is the embeddings and
``hidden_states[i]`` the output of encoder layer ``i - 1`` (0-based). Every score, key and feature
lookup goes through ``HiddenIndex`` so "the layer whose output is the features" and "the layer whose
attention rates the tokens" can never be off by one from each other.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class HiddenIndex:
    """A hidden-state index normalised to ``[0, L]``, with the encoder layer that produced it."""

    index: int  # into hidden_states, 0 <= index <= num_layers
    num_layers: int

    @classmethod
    def of(cls, index: int, num_layers: int) -> HiddenIndex:
        """Normalise ``index`` (negative counts from the end, like Python) for a tower of ``num_layers`` layers.

        Raises ValueError naming ``vision_feature_layer`` outside ``[-(L + 1), L]`` or for a non-int.
        """
        if (
            isinstance(index, bool)
            or not isinstance(index, numbers.Integral)
            or not -(num_layers + 1) <= index <= num_layers
        ):
            raise ValueError(
                f"vision_feature_layer must be an int in [{-(num_layers + 1)}, {num_layers}] (an index into the "
                f"vision tower's {num_layers + 1} hidden states), got {index!r}"
            )
        return cls(int(index) % (num_layers + 1), num_layers)

    @property
    def layer(self) -> int:
        """0-based encoder layer whose output this hidden state is; ValueError for the embeddings (index 0)."""
        if self.index == 0:
            raise ValueError(
                "vision_feature_layer 0 selects the embeddings, which no encoder layer's attention produced; "
                f"need a layer index other than 0 or {-self.num_layers - 1}"
            )
        return self.index - 1

    @property
    def layer_input(self) -> int:
        """Hidden-state index of the input of ``layer`` (the state its layer norm and q/k projections read)."""
        return self.layer
