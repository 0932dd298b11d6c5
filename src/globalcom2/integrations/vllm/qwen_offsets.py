"""How the Qwen-VL plugin carries each kept image token's stock position through vLLM (no vLLM import).

A kept token at merged-grid row r, column c of its image sits at M-RoPE position (b, b + r, b + c), b the
image's first slot. Its embedding row carries ``[r // 128, r % 128, c // 128, c % 128]`` as 4 extra columns
(integers below 128: exact in fp16 and bf16); the prompt's positions give every slot b
(``expanded_positions``) and the model adds (0, r, c) (``decode_offsets``) before the language model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

#: extra columns per compressed image row
OFFSET_COLUMNS = 4
_BASE = 128


def encode_offsets(index: torch.Tensor, width: int) -> torch.Tensor:
    """(K, 4) float: the offset columns of kept tokens ``index`` (raster indices into an image ``width`` merged
    tokens wide)."""
    index = index.long()
    r, c = index // int(width), index % int(width)
    return torch.stack([r // _BASE, r % _BASE, c // _BASE, c % _BASE], dim=1).float()


def decode_offsets(columns: torch.Tensor) -> torch.Tensor:
    """(K, 3) long (0, r, c) of (K, 4) offset columns."""
    v = columns.float().round().long()
    r, c = v[:, 0] * _BASE + v[:, 1], v[:, 2] * _BASE + v[:, 3]
    return torch.stack([torch.zeros_like(r), r, c], dim=1)


def _grid(feature) -> tuple[int, int, int]:
    return tuple(int(x) for x in feature.data["image_grid_thw"].data.tolist())


def expanded_positions(
    stock: Callable[[list[int], list], tuple[torch.Tensor, int]],
    input_tokens: Sequence[int],
    mm_features: Sequence,
    merge_size: int,
    image_token: int,
) -> tuple[torch.Tensor, int]:
    """((3, L) positions, delta) of a prompt whose images hold K <= h' w' placeholders each.

    ``stock(tokens, features)`` is the model's own ``get_mrope_input_positions``: it is called on the prompt
    with every image expanded back to its h' w' slots (features' offsets shifted to match), then each image's
    K slots take its first slot's position and every other token its stock position; the delta (decode
    positions) is stock's plus the tokens removed, so decoding continues exactly where stock's does.
    """
    features = sorted(mm_features, key=lambda f: f.mm_position.offset)
    expanded: list[int] = []
    moved = []
    index: list[int] = []
    src = shift = 0
    for f in features:
        o, k = int(f.mm_position.offset), int(f.mm_position.length)
        if f.modality != "image":
            moved.append(dataclasses.replace(f, mm_position=dataclasses.replace(f.mm_position, offset=o + shift)))
            continue
        _, h, w = _grid(f)
        n = (h // merge_size) * (w // merge_size)
        expanded.extend(input_tokens[src:o])
        index.extend(range(src + shift, o + shift))
        moved.append(dataclasses.replace(f, mm_position=dataclasses.replace(f.mm_position, offset=o + shift,
                                                                            length=n, is_embed=None)))  # fmt: skip
        expanded.extend([image_token] * n)
        index.extend([o + shift] * k)  # every kept slot at the image's first slot; forward adds (0, r, c)
        shift += n - k
        src = o + k
    expanded.extend(input_tokens[src:])
    index.extend(range(src + shift, len(input_tokens) + shift))
    positions, delta = stock(expanded, moved)
    positions = torch.as_tensor(positions)
    return positions[:, torch.tensor(index, dtype=torch.long)], int(delta) + shift
