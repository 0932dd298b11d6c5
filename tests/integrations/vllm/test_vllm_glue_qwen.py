"""The Qwen-VL vLLM plugin's glue that needs no vLLM: the offset columns, the prompt positions, the
replicated scoring block and the forward taps (the engine-level tests are in ``test_vllm_qwen.py``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from globalcom2.integrations.vllm.qwen_offsets import OFFSET_COLUMNS, decode_offsets, encode_offsets, expanded_positions
from globalcom2.integrations.vllm.qwen_score import (
    ForwardTap,
    QwenScoreBlock,
    QwenScoreWeights,
)
from globalcom2.models import qwen_common as qc
from globalcom2.testing import tiny_qwen

IMAGE = 7  # the image placeholder id of the fake prompts


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_offset_columns_are_exact_in_every_embedding_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    width, height = 700, 300  # wider and taller than 256: the split into 128s is what keeps bf16 exact
    index = torch.randperm(width * height, generator=g)[:5000].sort().values
    cols = encode_offsets(index, width).to(dtype)
    assert cols.shape == (5000, OFFSET_COLUMNS) and float(cols.max()) < 128
    got = decode_offsets(cols)
    assert torch.equal(got[:, 0], torch.zeros(5000, dtype=torch.long))
    assert torch.equal(got[:, 1], index // width) and torch.equal(got[:, 2], index % width)


@dataclasses.dataclass(frozen=True)
class _Range:
    offset: int
    length: int
    is_embed: object = None


@dataclasses.dataclass
class _Item:
    data: torch.Tensor


@dataclasses.dataclass
class _Feature:
    modality: str
    mm_position: _Range
    data: dict


def _stock(tokens, features, merge=2):
    """Qwen2.5-VL's rule (vLLM's ``get_mrope_input_positions`` for images): text runs from the previous max + 1,
    an image at (t, h, w) grid indices from the position after the text before it."""
    pos, st = [], 0
    for f in sorted(features, key=lambda f: f.mm_position.offset):
        _, h, w = (int(x) for x in f.data["image_grid_thw"].data)
        h, w = h // merge, w // merge
        start = pos[-1].max() + 1 if pos else 0
        text = f.mm_position.offset - st
        pos.append(np.broadcast_to(np.arange(text), (3, text)) + start)
        grid = np.indices((1, h, w)).reshape(3, -1) + text + start
        pos.append(grid)
        st = f.mm_position.offset + h * w
    if st < len(tokens):
        start = pos[-1].max() + 1 if pos else 0
        pos.append(np.broadcast_to(np.arange(len(tokens) - st), (3, len(tokens) - st)) + start)
    p = np.concatenate(pos, axis=1)
    return torch.from_numpy(p), int(p.max() + 1 - len(tokens))


def _prompt(grids, kept):
    """(tokens, features) of text(3) image text(2) image ... text(4), image i holding kept[i] placeholders."""
    tokens, feats = [1, 2, 3], []
    for (h, w), k in zip(grids, kept):
        feats.append(_Feature("image", _Range(len(tokens), k), {"image_grid_thw": _Item(torch.tensor([1, h, w]))}))
        tokens += [IMAGE] * k + [4, 5]
    return tokens + [6, 6, 6, 6], feats


@pytest.mark.parametrize("grids", [[(8, 12)], [(8, 12), (6, 4)], [(4, 20), (10, 2), (6, 6)]])
def test_kept_tokens_land_on_their_stock_positions_and_text_keeps_stock(grids):
    g = torch.Generator().manual_seed(len(grids))
    full = [(h // 2) * (w // 2) for h, w in grids]
    stock_tokens, stock_feats = _prompt(grids, full)
    stock_pos, stock_delta = _stock(stock_tokens, stock_feats)
    kept = [torch.randperm(n, generator=g)[: max(1, n // 4)].sort().values for n in full]
    tokens, feats = _prompt(grids, [len(k) for k in kept])
    pos, delta = expanded_positions(_stock, tokens, feats, 2, IMAGE)
    assert pos.shape == (3, len(tokens))
    # every token's stock index in the full prompt
    where, src, shift = [], 0, 0
    for f, k, n in zip(feats, kept, full):
        o = f.mm_position.offset
        where += list(range(src + shift, o + shift)) + (k + o + shift).tolist()
        shift += n - len(k)
        src = o + len(k)
    where += list(range(src + shift, len(tokens) + shift))
    offsets = torch.zeros(3, len(tokens), dtype=torch.long)
    for f, k, (_, w) in zip(feats, kept, grids):
        o = f.mm_position.offset
        offsets[:, o : o + len(k)] = decode_offsets(encode_offsets(k, w // 2)).t()
    assert torch.equal(pos + offsets, stock_pos[:, where])  # kept tokens and text: stock's positions
    assert delta == stock_delta + sum(full) - sum(len(k) for k in kept)  # decoding continues as stock's
    assert int((pos + offsets).max()) + 1 - len(tokens) == delta


def test_full_grid_positions_are_stock():
    grids = [(8, 12), (6, 4)]
    tokens, feats = _prompt(grids, [(h // 2) * (w // 2) for h, w in grids])
    pos, delta = expanded_positions(_stock, tokens, feats, 2, IMAGE)
    stock_pos, stock_delta = _stock(tokens, feats)
    offsets = torch.zeros_like(pos)
    for f, (h, w) in zip(feats, grids):
        n = (h // 2) * (w // 2)
        o = f.mm_position.offset
        offsets[:, o : o + n] = decode_offsets(encode_offsets(torch.arange(n), w // 2)).t()
    assert torch.equal(pos + offsets, stock_pos) and delta == stock_delta


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_replicated_scoring_block_rates_tokens_as_the_stock_block(family):
    """The copy (built from the checkpoint's names) + vLLM's half-width rotary give the HF block's scores."""
    from globalcom2.testing.tiny import demo_image

    make = tiny_qwen.tiny_qwen2_5_vl_model if family == "qwen2_5_vl" else tiny_qwen.tiny_qwen3_vl_model
    proc = (tiny_qwen.tiny_qwen2_5_vl_processor if family == "qwen2_5_vl" else tiny_qwen.tiny_qwen3_vl_processor)()
    model = make(seed=0)
    inputs = proc(images=[demo_image(height=220, width=300, seed=1)], text=[tiny_qwen.qwen_prompt()],
                  return_tensors="pt")  # fmt: skip
    vis = model.model.visual
    idx = len(vis.blocks) - 1
    seen: dict = {}
    h = qc.capture_block_input(vis.blocks[idx], seen)
    with torch.no_grad():
        model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    h.remove()
    ref, _ = qc.attention_received(vis.blocks[idx], seen["input"])
    vc = model.config.vision_config
    block = QwenScoreBlock(vc.hidden_size, vc.num_heads, rms=family == "qwen2_5_vl", qwen3=family == "qwen3_vl")
    copy = QwenScoreWeights(block, idx)
    names = [(f"model.visual.blocks.{i}.{n}", p) for i, b in enumerate(vis.blocks) for n, p in b.named_parameters()]
    assert len(list(copy.keep(names))) == len(names)  # the weights pass through unchanged
    assert copy.check() == {f"globalcom2_score.{k}" for k, _ in block.named_parameters()}
    cos, sin = seen["input"].position_embeddings
    half = cos.shape[-1] // 2
    assert torch.equal(cos[:, :half], cos[:, half:])  # transformers' (cos, sin) repeat one half: vLLM's width
    inp = qc.BlockInput(seen["input"].hidden, seen["input"].cu_seqlens,
                        (torch.cat((cos[:, :half],) * 2, -1), torch.cat((sin[:, :half],) * 2, -1)))  # fmt: skip
    got, _ = qc.attention_received(block, inp)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)


def test_checkpoint_without_the_scoring_block_is_an_error_naming_it():
    block = QwenScoreBlock(16, 2, rms=True, qwen3=False)
    copy = QwenScoreWeights(block, 3)
    list(copy.keep([("visual.blocks.2.norm1.weight", torch.ones(16))]))
    with pytest.raises(ValueError, match="vision block 3's attn.qkv.bias, attn.qkv.weight, norm1.weight"):
        copy.check()


def test_forward_taps_stack_and_come_off_last_first():
    lin = nn.Linear(2, 2)
    seen = []
    a = ForwardTap(lin, before=lambda args, kw: seen.append("a"))
    b = ForwardTap(lin, after=lambda out: seen.append("b"))
    lin(torch.ones(1, 2))
    assert seen == ["a", "b"]
    b.remove()
    a.remove()
    assert "forward" not in lin.__dict__
    lin(torch.ones(1, 2))
    assert seen == ["a", "b"]
