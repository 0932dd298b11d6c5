"""The positions guarantee on the patched Qwen2.5-VL / Qwen3-VL (tiny models, ``model(**processor(...))``):

* R = 1 with neutral options is stock bit for bit (logits, generate);
* every R < 1 is exactly "stock with some visual tokens removed": the language model receives stock's own
  inputs (embeddings, 3-D M-RoPE positions, DeepStack rows) with the removed columns dropped;
* decode positions continue at stock's, batch == alone (mixed sizes, two images in a row, left/right
  padding, SDPA/eager, fp32/bf16), ``remove()`` is bit-exact, labels give a loss.
"""

from __future__ import annotations

import pytest
import torch
from qwen_helpers import (  # noqa: F401
    BATCH_GROUPS,
    BATCH_PROMPTS,
    GROUPS,
    PROMPTS,
    QWEN,
    _no_grad,
    _one_thread,
    assert_batch_like_alone,
    max_row_diff,
    prepare,
    qwen_batch,
    record_lm,
    stock_lm_check,
    valid_rows,
)

import globalcom2
from globalcom2.models import qwen_common as qc

NEUTRAL = dict(retention_ratio=1.0, allocation="uniform")
#: vision-side methods at R < 1 whose every emitted token is a stock token (VisionZip merges: separate test)
SELECTING = [
    ("globalcom2", {"budget": "exact"}),
    ("globalcom2", {}),
    ("fastervlm", {}),
    ("divprune", {}),
    ("cdpruner", {}),
    ("dart", {"form": "embedding"}),
    ("random", {"budget": "exact"}),
    ("composed", {"selector": "cdpruner", "budget": "exact"}),
]
GEN = {"max_new_tokens": 4, "do_sample": False}


def _kept_columns(model, inputs, method, options):
    """(B, L) bool: the columns of the processor's prompt a vision-side method keeps (every text token, and the
    kept image placeholders), from the patched model's own records."""
    batch = prepare(model, inputs)
    is_img = inputs["input_ids"] == model.config.image_token_id
    keep = inputs["attention_mask"].bool().clone()
    flags = torch.cat([torch.isin(torch.arange(c), t.index) for c, t in zip(batch.stock_counts, batch.extras)])
    keep[is_img] = flags
    return keep


@pytest.mark.parametrize(
    "method,options",
    [("globalcom2", NEUTRAL), ("fastervlm", {"retention_ratio": 1.0}), ("divprune", {"retention_ratio": 1.0})],
)
def test_r1_is_stock_bit_for_bit(qwen, method, options):
    _, model, proc = qwen
    inputs = qwen_batch(proc)
    ref = model(**inputs).logits
    globalcom2.apply(model, method, **options)
    assert torch.equal(model(**inputs).logits, ref)


@pytest.mark.parametrize("method,options", SELECTING, ids=lambda v: str(v))
def test_r_below_one_is_stock_minus_the_removed_columns(qwen, method, options):
    """What the language model receives equals stock's own LM inputs with the removed columns dropped."""
    family, model, proc = qwen
    inputs = qwen_batch(proc)
    seen, handle = record_lm(model)
    try:
        model(**inputs)  # stock
        globalcom2.apply(model, method, retention_ratio=0.4, **options)
        model(**inputs)
        keep = _kept_columns(model, inputs, method, options)
    finally:
        handle.remove()
    stock, ours = seen
    assert int(keep.sum()) < int(inputs["attention_mask"].sum())  # something was removed
    mask = ours["attention_mask"].bool()
    n_vis = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    is_img = inputs["input_ids"] == model.config.image_token_id
    stock_rows = (is_img.flatten().long().cumsum(0) - 1).view_as(is_img)  # stock DeepStack row of a slot
    for b in range(mask.shape[0]):
        cols = keep[b]
        assert torch.equal(ours["inputs_embeds"][b, mask[b]], stock["inputs_embeds"][b, cols])
        assert torch.equal(ours["position_ids"][-3:, b, mask[b]], stock["position_ids"][-3:, b, cols])
        if family == "qwen3_vl":
            got_rows = ours["visual_pos_masks"][: b + 1].sum().item() - ours["visual_pos_masks"][b].sum().item()
            want = stock_rows[b][cols & is_img[b]]
            n_b = int(ours["visual_pos_masks"][b].sum())
            for ls, lo in zip(stock["deepstack_visual_embeds"], ours["deepstack_visual_embeds"]):
                assert torch.equal(lo[got_rows : got_rows + n_b], ls[want])
    assert n_vis > 0


def test_visionzip_keeps_stock_tokens_and_puts_merged_ones_at_their_targets(qwen):
    family, model, proc = qwen
    inputs = qwen_batch(proc)
    seen, handle = record_lm(model)
    try:
        model(**inputs)
        globalcom2.apply(model, "visionzip", retention_ratio=0.4)
        model(**inputs)
        keep = _kept_columns(model, inputs, "visionzip", {})
    finally:
        handle.remove()
    stock, ours = seen
    mask = ours["attention_mask"].bool()
    is_img = inputs["input_ids"] == model.config.image_token_id
    merged = 0
    for b in range(mask.shape[0]):
        cols = keep[b]
        assert torch.equal(ours["position_ids"][-3:, b, mask[b]], stock["position_ids"][-3:, b, cols])
        same = (ours["inputs_embeds"][b, mask[b]] == stock["inputs_embeds"][b, cols]).all(-1)
        assert bool(same[~is_img[b][cols]].all())  # every text token is stock's
        merged += int((~same).sum())
    assert merged > 0  # the contextual tokens differ from the targets they stand at


@pytest.mark.parametrize("method", ["globalcom2", "divprune"])
def test_generate_decodes_at_stock_positions(qwen, method):
    """New token i sits at stock's last prompt position + 1 + i (all three axes), whatever was dropped."""
    _, model, proc = qwen
    inputs = qwen_batch(proc)
    seen, handle = record_lm(model)
    try:
        ref = model.generate(**inputs, **GEN)
        n_stock = len(seen)
        globalcom2.apply(model, method, **NEUTRAL) if method == "globalcom2" else globalcom2.apply(model, method)
        same = model.generate(**inputs, **GEN)
        n_neutral = len(seen)
        globalcom2.apply(model, method, retention_ratio=0.3, **({"budget": "exact"} if method == "globalcom2" else {}))
        model.generate(**inputs, **GEN)
    finally:
        handle.remove()
    if method == "globalcom2":
        assert torch.equal(same, ref)  # R = 1 neutral: stock tokens
    stock_steps = [s["position_ids"][-3:] for s in seen[1:n_stock]]
    ours_steps = [s["position_ids"][-3:] for s in seen[n_neutral + 1 :]]
    assert len(ours_steps) == len(stock_steps) == GEN["max_new_tokens"] - 1
    for a, b in zip(ours_steps, stock_steps):
        assert torch.equal(a, b)


CASES = [
    ("sdpa", torch.float32, "left"),
    ("sdpa", torch.bfloat16, "right"),
    ("eager", torch.float32, "right"),
    ("eager", torch.bfloat16, "left"),
]


@pytest.mark.parametrize("family", list(QWEN))
@pytest.mark.parametrize("attn,dtype,side", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_batch_equals_alone(family, attn, dtype, side):
    """Rows of mixed image sizes (one with two images): under eager every row hands the language model its
    inputs alone bit for bit and the logits differ by no more than the stock language model's own on those inputs;
    under SDPA within stock's own batch-vs-alone difference."""
    make_model, make_proc = QWEN[family]
    model, proc = make_model(attn_implementation=attn, dtype=dtype), make_proc(padding_side=side)
    inputs = qwen_batch(proc, BATCH_GROUPS, BATCH_PROMPTS)
    alone = [qwen_batch(proc, [g], [p]) for g, p in zip(BATCH_GROUPS, BATCH_PROMPTS)]
    stock_rows = valid_rows(model(**inputs).logits, inputs["attention_mask"])
    stock_diff = max_row_diff(stock_rows, [model(**a).logits[0] for a in alone])
    globalcom2.apply(model, "globalcom2", retention_ratio=0.4, budget="exact")
    seen, handle = record_lm(model)
    try:
        out = model(**inputs).logits
        alone_logits = [model(**a).logits[0] for a in alone]
    finally:
        handle.remove()
    rows = valid_rows(out, seen[0]["attention_mask"])
    lm_check = stock_lm_check(model, seen[0], seen[1:])
    assert_batch_like_alone(max_row_diff(rows, alone_logits), stock_diff, dtype, attn, lm_check)


def test_generate_batch_equals_alone(qwen):
    _, model, proc = qwen
    globalcom2.apply(model, "globalcom2", retention_ratio=0.4, budget="exact")
    together = model.generate(**qwen_batch(proc), **GEN)
    for b, (g, p) in enumerate(zip(GROUPS, PROMPTS)):
        alone = model.generate(**qwen_batch(proc, [g], [p]), **GEN)
        assert torch.equal(alone[0, -GEN["max_new_tokens"] :], together[b, -GEN["max_new_tokens"] :])


def test_remove_is_bit_exact_and_labels_give_a_loss(qwen):
    _, model, proc = qwen
    inputs = qwen_batch(proc)
    ref = model(**inputs).logits
    globalcom2.apply(model, "globalcom2", retention_ratio=0.3, budget="exact")
    out = model(**inputs, labels=inputs["input_ids"])
    assert out.loss is not None and torch.isfinite(out.loss)
    model.generate(**inputs, **GEN)
    globalcom2.remove(model)
    assert not globalcom2.is_patched(model)
    assert torch.equal(model(**inputs).logits, ref)


def test_processor_output_passes_unchanged_and_video_is_refused(qwen):
    _, model, proc = qwen
    inputs = qwen_batch(proc)
    globalcom2.apply(model, "fastervlm", retention_ratio=0.5)
    assert {"image_grid_thw", "pixel_values"} <= set(inputs)
    model(**inputs)
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model(**inputs, pixel_values_videos=torch.zeros(4, 4))
    bad = dict(inputs)
    bad.pop("image_grid_thw")
    with pytest.raises(ValueError, match="image_grid_thw is required"):
        model(**bad)
    with pytest.raises(ValueError, match="pixel_values must be"):
        model(**{**inputs, "pixel_values": inputs["pixel_values"][:-1]})


def test_stock_positions_recomputed_by_the_model_match(qwen):
    """The positions the patched model hands over at R = 1 are what get_rope_index gives the prompt."""
    _, model, proc = qwen
    inputs = qwen_batch(proc)
    globalcom2.apply(model, "globalcom2", **NEUTRAL)
    seen, handle = record_lm(model)
    try:
        model(**inputs)
    finally:
        handle.remove()
    stock, _ = qc.stock_position_ids(model, inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    m = inputs["attention_mask"].bool()
    assert torch.equal(seen[0]["position_ids"][-3:].permute(1, 2, 0)[m], stock.permute(1, 2, 0)[m])
