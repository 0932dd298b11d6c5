"""What every adapter shares: splicing visual features into the prompt, reading the prompt's text.

Nothing here knows a family's geometry: an image is a block of ``counts[i]`` placeholder tokens
(``config.image_token_id``) in ``input_ids`` that becomes ``features[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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
    image_token_id = model.config.image_token_id
    bsz = input_ids.shape[0]
    if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(attention_mask.shape)}"
        )
    is_img = input_ids == image_token_id
    per_row = is_img.sum(1).tolist()
    if sum(per_row) != sum(stock_counts):
        raise ValueError(
            f"input_ids hold {sum(per_row)} image placeholder tokens but the images need {sum(stock_counts)} "
            f"({stock_counts}); pass input_ids, pixel_values and image_sizes from the same processor call"
        )
    embeds = model.get_input_embeddings()(input_ids)
    dtype = embeds.dtype
    rows, row_labels, spans = [], [], []
    img = 0
    for b in range(bsz):
        keep = attention_mask[b].bool()
        pos = torch.nonzero(is_img[b] & keep).squeeze(1).tolist()
        if len(pos) != per_row[b]:
            raise ValueError("image placeholder tokens must not be masked out by attention_mask")
        pieces, lab, row_spans, cursor, used, length = [], [], [], 0, 0, 0
        text_pos = torch.nonzero(keep).squeeze(1)
        # walk the row's images in order; each consumes the next stock_counts[img] placeholders
        while used < len(pos):
            if img >= len(stock_counts):
                raise ValueError("input_ids hold more image placeholder blocks than there are images")
            start = pos[used]
            end = pos[used + stock_counts[img] - 1] + 1 if used + stock_counts[img] - 1 < len(pos) else None
            if end is None or end - start != stock_counts[img]:
                raise ValueError(
                    f"image {img} needs {stock_counts[img]} consecutive placeholder tokens in input_ids; "
                    "pass input_ids, pixel_values and image_sizes from the same processor call"
                )
            seg = text_pos[(text_pos >= cursor) & (text_pos < start)]
            feat = image_features[img].to(embeds.device, dtype)
            pieces += [embeds[b, seg], feat]
            if labels is not None:
                lab += [labels[b, seg], labels.new_full((feat.shape[0],), ignore_index)]
            length += seg.numel()
            row_spans.append((length, length + feat.shape[0]))
            length += feat.shape[0]
            cursor, used, img = end, used + stock_counts[img], img + 1
        seg = text_pos[text_pos >= cursor]
        pieces.append(embeds[b, seg])
        rows.append(torch.cat(pieces, dim=0))
        if labels is not None:
            row_labels.append(torch.cat([*lab, labels[b, seg]], dim=0))
        spans.append(row_spans)
    if img != len(stock_counts):
        raise ValueError(f"{len(stock_counts)} images were given but input_ids place only {img}")
    empty = [b for b, r in enumerate(rows) if r.shape[0] == 0]
    if empty:
        raise ValueError(
            f"row(s) {empty} of the batch would reach the language model with no token at all: their prompt is "
            "only image placeholders and the method keeps none of the image's tokens at this retention_ratio; "
            "raise retention_ratio or put text in the prompt"
        )

    max_len = max(r.shape[0] for r in rows)
    d = embeds.shape[-1]
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
