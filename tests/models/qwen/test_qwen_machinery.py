"""Qwen2.5-VL / Qwen3-VL machinery (``globalcom2.models.qwen_common``) on tiny random models.

A proof-of-concept "patched forward / generate" lives in this file only (``compress``,
``patched_forward``, ``patched_generate``): the vision tower runs stock, a trivial selection keeps
every other merged token (or all of them), ``pack_qwen`` builds the shortened prompt, and stock
``forward`` / ``generate`` run on it. What is checked:

1. R = 1 is bit-identical to stock (logits, DeepStack inputs, generated tokens); R < 1 hands the
   language model exactly stock's positions with the dropped columns removed, and equals an
   independent "stock with those tokens removed" computed row by row from stock's own LM inputs.
2. ``model(**inputs)`` / ``model.generate(**inputs)`` inputs from the processor, unchanged; decode
   positions continue at stock's (``generate``'s ``position_ids`` bookkeeping, and ``rope_deltas`` for
   a hand-written decoding loop).
3. Qwen3-VL DeepStack rows are pruned with the same kept indices at every level.
4. Batch == alone (mixed sizes, several images per prompt, left/right padding, SDPA/eager, fp32/bf16).
5. Merged tokens come out in raster order of the merged grid (Qwen2.5-VL undoes its window order).
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from qwen_helpers import (  # noqa: F401
    BATCH_GROUPS,
    BATCH_PROMPTS,
    GROUPS,
    IMAGES,
    PROMPTS,
    _no_grad,
    _one_thread,
    assert_batch_like_alone,
    max_row_diff,
    qwen_batch,
    record_lm,
    stock_lm_check,
    valid_rows,
)
from qwen_helpers import QWEN as FAMILIES
from transformers import GenerationMixin, Qwen2_5_VLForConditionalGeneration

from globalcom2.models import qwen_common as qc
from globalcom2.testing.tiny_qwen import qwen_prompt


@pytest.fixture(scope="module")
def models():
    return {name: make() for name, (make, _) in FAMILIES.items()}


@pytest.fixture(scope="module")
def processors():
    return {name: make() for name, (_, make) in FAMILIES.items()}


batch = qwen_batch


def keep_all(n: int) -> torch.Tensor:
    return torch.arange(n)


def every_other(n: int) -> torch.Tensor:
    return torch.arange(0, n, 2)


# ----------------------------------------------------------------------------- proof-of-concept patch


def _side(mask: torch.Tensor) -> str:
    return "right" if bool((mask[:, -1] == 0).any()) else "left"


def compress(model, inputs, select, padding_side=None) -> qc.QwenPacked:
    """Stock tower, ``select(N_i)`` -> kept indices per image, ``pack_qwen``."""
    vf = qc.visual_features(model, inputs["pixel_values"], inputs["image_grid_thw"])
    kept = [select(f.shape[0]) for f in vf.features]
    feats = [f[k] for f, k in zip(vf.features, kept)]
    deep = None if vf.deepstack is None else [[lvl[i][k] for i, k in enumerate(kept)] for lvl in vf.deepstack]
    return qc.pack_qwen(
        model,
        inputs["input_ids"],
        inputs["attention_mask"],
        inputs["image_grid_thw"],
        feats,
        kept,
        deep,
        mm_token_type_ids=inputs.get("mm_token_type_ids"),
        padding_side=padding_side or _side(inputs["attention_mask"]),
    )


# How the packed prompt reaches stock forward / generate (see models/qwen_common.py):
#   "hook":    inputs_embeds + attention_mask, positions and DeepStack set by ``packed_lm_inputs`` (every 5.x);
#   "embeds":  inputs_embeds + attention_mask + explicit position_ids (generate carries 3-D position_ids only
#              from ~5.19; DeepStack still through ``deepstack_injection``);
#   "encoder": shortened input_ids + mm_encoder_outputs + explicit position_ids (recent 5.x only).
_NEW_GENERATE = hasattr(GenerationMixin, "_prepare_position_ids_for_generation")
_ENCODER = "mm_encoder_outputs" in inspect.signature(Qwen2_5_VLForConditionalGeneration.forward).parameters
FORWARD_MECHANISMS = ["hook", "embeds"] + (["encoder"] if _ENCODER else [])
GENERATE_MECHANISMS = (
    ["hook"] + (["embeds"] if _NEW_GENERATE else []) + (["encoder"] if _ENCODER and _NEW_GENERATE else [])
)


def patched_forward(model, inputs, select, mechanism="hook", **kwargs):
    pk = compress(model, inputs, select)
    if mechanism == "hook":
        with qc.packed_lm_inputs(model, pk):
            return model(inputs_embeds=pk.inputs_embeds, attention_mask=pk.attention_mask, **kwargs), pk
    qc.base_model(model).rope_deltas = qc.rope_deltas_for(model, pk)  # for a hand-written decoding loop
    if mechanism == "embeds":
        with qc.deepstack_injection(model, pk):
            return model(**pk.embeds_kwargs(), **kwargs), pk
    return model(**pk.encoder_kwargs(), **kwargs), pk


def patched_generate(model, inputs, select, mechanism="hook", **kwargs):
    """New tokens only (B, T)."""
    pk = compress(model, inputs, select, padding_side="left")
    if mechanism == "hook":
        with qc.packed_lm_inputs(model, pk):
            return model.generate(inputs_embeds=pk.inputs_embeds, attention_mask=pk.attention_mask, **kwargs)
    qc.base_model(model).rope_deltas = qc.rope_deltas_for(model, pk)
    if mechanism == "embeds":
        with qc.deepstack_injection(model, pk):
            return model.generate(**pk.embeds_kwargs(generation=True), **kwargs)
    out = model.generate(**pk.encoder_kwargs(generation=True), **kwargs)
    return out[:, pk.input_ids.shape[1] :]


GEN = {"max_new_tokens": 5, "do_sample": False}


def stock_generate(model, inputs, **kwargs):
    return model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1] :]


@pytest.fixture(scope="module")
def stock_runs(models, processors):
    """Per family, stock generate on ``batch``: (new tokens, position_ids of every decode step)."""
    return {
        f: _decode_positions(models[f], lambda f=f: stock_generate(models[f], batch(processors[f]), **GEN))
        for f in FAMILIES
    }


# ------------------------------------------------------------------------------------ tiny + geometry


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_output_and_chat_template(family, models, processors):
    proc = processors[family]
    inputs = batch(proc)
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= set(inputs)
    if "mm_token_type_ids" in inspect.signature(models[family].model.get_rope_index).parameters:
        assert "mm_token_type_ids" in inputs  # what get_rope_index reads images from (recent 5.x)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is this ?"}]}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == qwen_prompt()
    n_pad = (inputs["input_ids"] == proc.image_token_id).sum(1)
    counts = qc.merged_grid_thw(inputs["image_grid_thw"], models[family].config).prod(1)
    assert n_pad.tolist() == [int(counts[0]), int(counts[1] + counts[2])]


GEOMETRIES = {
    "qwen2_5_vl": {"patch_size": 8, "spatial_merge_size": 3, "temporal_patch_size": 1},
    "qwen3_vl": {"patch_size": 6, "spatial_merge_size": 3, "temporal_patch_size": 1, "num_position_embeddings": 36},
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("geometry", ["default", "odd"])
def test_geometry_and_token_coords_match_get_rope_index(family, geometry, models, processors):
    """Merged grid from image_grid_thw + config; token i's stock 3-D position is start + (t, row, col)."""
    if geometry == "default":
        model, proc = models[family], processors[family]
    else:
        g = GEOMETRIES[family]
        make_model, make_proc = FAMILIES[family]
        model = make_model(**g)
        proc = make_proc(**{k: v for k, v in g.items() if k != "num_position_embeddings"})
    inputs = batch(proc)
    vc = model.config.vision_config
    geo = qc.image_geometry(inputs["image_grid_thw"], model)
    for gm, (t, h, w) in zip(geo, inputs["image_grid_thw"].tolist()):
        assert (gm.t, gm.h, gm.w) == (t, h // vc.spatial_merge_size, w // vc.spatial_merge_size)
        assert gm.patch_size == vc.patch_size and gm.pixels == (h * vc.patch_size, w * vc.patch_size)
    pos, _ = qc.stock_position_ids(model, inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    is_img = inputs["input_ids"] == model.config.image_token_id
    vis_pos = pos.permute(1, 2, 0)[is_img]  # (sum N, 3) in row-major image order
    coords = qc.token_coords(inputs["image_grid_thw"], model)
    for c, p in zip(coords, vis_pos.split([c.shape[0] for c in coords])):
        start = p[0, 1]  # token 0 sits at (start, start, start)
        assert torch.equal(p - start, c)
    # the tower emits exactly N_i tokens per image, and R = 1 is stock bit for bit in this geometry too
    vf = qc.visual_features(model, inputs["pixel_values"], inputs["image_grid_thw"])
    assert [f.shape[0] for f in vf.features] == [gm.n_tokens for gm in geo]
    out, _ = patched_forward(model, inputs, keep_all)
    ref = model(**inputs).logits
    m = inputs["attention_mask"].bool()
    assert torch.equal(out.logits[m], ref[m])


def _zero_mixing(model):
    """Vision blocks become identities (zero attention / MLP outputs) and Qwen3-VL's position table zero:
    a merged token then depends on its own m x m patches only."""
    vis = qc.base_model(model).visual
    for blk in vis.blocks:
        mlp_out = blk.mlp.down_proj if hasattr(blk.mlp, "down_proj") else blk.mlp.linear_fc2
        for lin in (blk.attn.proj, mlp_out):
            lin.weight.zero_()
            lin.bias.zero_()
    if hasattr(vis, "pos_embed"):
        vis.pos_embed.weight.zero_()


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_tokens_come_out_in_raster_order(family, processors):
    """An image of 3 x 5 uniformly coloured merged cells: token i equals the token of a plain image of cell
    (i // 5, i % 5)'s colour. For Qwen2.5-VL the 3 x 5 grid spans 6 windows (2 x 2 cells each, cut by the
    border), so the tower's internal order is not raster; its output is."""
    model = FAMILIES[family][0]()
    _zero_mixing(model)
    vc = model.config.vision_config
    cell = vc.patch_size * vc.spatial_merge_size
    rows, cols = 3, 5
    colors = np.random.default_rng(0).integers(0, 255, (rows * cols, 3)).astype(np.uint8)
    grid = colors.reshape(rows, cols, 3).repeat(cell, 0).repeat(cell, 1)  # (3 cell, 5 cell, 3)
    from PIL import Image

    plain = [Image.fromarray(np.ascontiguousarray(np.broadcast_to(c, (2 * cell, 2 * cell, 3)))) for c in colors]
    out = processors[family].image_processor(images=[Image.fromarray(grid), *plain], return_tensors="pt")
    assert out["image_grid_thw"][0].tolist() == [1, rows * vc.spatial_merge_size, cols * vc.spatial_merge_size]
    vf = qc.visual_features(model, out["pixel_values"], out["image_grid_thw"])
    expected = torch.stack([f[0] for f in vf.features[1:]])  # (15, D): colour c's token
    assert torch.equal(vf.features[0], expected)
    assert len({tuple(e.tolist()) for e in expected}) == rows * cols  # colours are told apart
    coords = qc.token_coords(out["image_grid_thw"][:1], model)[0]
    assert coords[:, 1].tolist() == [i // cols for i in range(15)]
    assert coords[:, 2].tolist() == [i % cols for i in range(15)]
    if family == "qwen2_5_vl":  # the tower's internal (window) order is not raster
        assert not torch.equal(
            qc.patch_order(model, out["image_grid_thw"][:1]), torch.arange(15 * vc.spatial_merge_size**2)
        )


# -------------------------------------------------------------------------------- R = 1 is stock


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mechanism", FORWARD_MECHANISMS)
def test_keep_all_is_stock_bit_for_bit(family, mechanism, models, processors):
    model, inputs = models[family], batch(processors[family])
    ref = model(**inputs).logits
    out, pk = patched_forward(model, inputs, keep_all, mechanism)
    assert torch.equal(pk.attention_mask, inputs["attention_mask"])
    assert torch.equal(out.logits, ref) or torch.equal(
        out.logits[inputs["attention_mask"].bool()], ref[inputs["attention_mask"].bool()]
    )
    m = inputs["attention_mask"].bool()
    assert torch.equal(pk.position_ids.permute(1, 2, 0)[m], pk.stock_position_ids.permute(1, 2, 0)[m])
    assert torch.equal(qc.rope_deltas_for(model, pk), pk.stock_rope_deltas)


def test_keep_all_deepstack_inputs_are_stock(models, processors):
    model, inputs = models["qwen3_vl"], batch(processors["qwen3_vl"])
    seen, handle = record_lm(model)
    try:
        model(**inputs)
        patched_forward(model, inputs, keep_all)
    finally:
        handle.remove()
    stock, ours = seen
    assert torch.equal(stock["visual_pos_masks"], ours["visual_pos_masks"])
    assert len(ours["deepstack_visual_embeds"]) == len(model.config.vision_config.deepstack_visual_indexes)
    for a, b in zip(stock["deepstack_visual_embeds"], ours["deepstack_visual_embeds"]):
        assert torch.equal(a, b)
    assert torch.equal(stock["inputs_embeds"], ours["inputs_embeds"])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mechanism", GENERATE_MECHANISMS)
def test_keep_all_generate_is_stock(family, mechanism, models, processors, stock_runs):
    model, inputs = models[family], batch(processors[family])
    ref = stock_runs[family][0]
    assert torch.equal(patched_generate(model, inputs, keep_all, mechanism, **GEN), ref)


# ---------------------------------------------------------------------- R < 1 is stock minus tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_positions_handed_to_the_lm_are_stock_columns(family, models, processors):
    """Kept visual tokens keep their original (t, h, w); text after an image keeps stock's positions."""
    model, inputs = models[family], batch(processors[family])
    seen, handle = record_lm(model)
    try:
        _, pk = patched_forward(model, inputs, every_other)
    finally:
        handle.remove()
    handed = seen[0]["position_ids"]  # (3, B, L')
    stock, _ = qc.stock_position_ids(model, inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    for b in range(inputs["input_ids"].shape[0]):
        slots = pk.attention_mask[b].bool()
        assert torch.equal(handed[:, b, slots], stock[:, b, pk.keep_mask[b]])
        assert bool((handed[:, b, ~slots] == 0).all())  # padding
    # the dropped tokens are exactly the odd ones of each image, and text is all kept
    is_img = inputs["input_ids"] == model.config.image_token_id
    assert torch.equal(pk.keep_mask[~is_img], inputs["attention_mask"].bool()[~is_img])
    assert [k.tolist() for k in pk.kept] == [
        every_other(f.shape[0]).tolist()
        for f in qc.visual_features(model, inputs["pixel_values"], inputs["image_grid_thw"]).features
    ]
    # rope_deltas continue after stock's last position: stock max + 1 == kept length + delta
    n_kept = pk.attention_mask.sum(1)
    assert torch.equal((n_kept[:, None] + pk.rope_deltas), stock.amax(dim=(0, 2))[:, None] + 1)
    assert torch.equal(pk.attention_mask.shape[1] + pk.rope_deltas_padded, stock.amax(dim=(0, 2))[:, None] + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_other_equals_stock_with_those_tokens_removed(family, processors):
    """Oracle: stock's own LM inputs (embeds, positions, DeepStack), columns removed row by row, one row at a
    time through the language model; eager attention so batch and alone must agree bit for bit."""
    model = FAMILIES[family][0](attn_implementation="eager")
    inputs = batch(processors[family])
    seen, handle = record_lm(model)
    try:
        ref_logits = model(**inputs).logits  # records stock's LM inputs
        out, pk = patched_forward(model, inputs, every_other)
    finally:
        handle.remove()
    stock = seen[0]
    lm = model.model.language_model
    is_img = inputs["input_ids"] == model.config.image_token_id
    vis_rows = torch.cumsum(is_img.reshape(-1), 0).reshape(is_img.shape) - 1  # stock DeepStack row of a slot
    for b in range(inputs["input_ids"].shape[0]):
        cols = torch.nonzero(pk.keep_mask[b]).squeeze(1)  # kept original columns, in order
        kw = {
            "inputs_embeds": stock["inputs_embeds"][b : b + 1, cols],
            "position_ids": stock["position_ids"][:, b : b + 1, cols],
        }
        if stock["visual_pos_masks"] is not None:
            mask = stock["visual_pos_masks"][b : b + 1, cols]
            rows = vis_rows[b, cols][mask[0]]
            kw |= {
                "visual_pos_masks": mask,
                "deepstack_visual_embeds": [d[rows] for d in stock["deepstack_visual_embeds"]],
            }
        alone = model.lm_head(lm(**kw).last_hidden_state)[0]
        assert torch.equal(valid_rows(out.logits, pk.attention_mask)[b], alone)
    assert not torch.equal(valid_rows(out.logits, pk.attention_mask)[0][-1], ref_logits[0, -1])  # R < 1 changed it


def test_every_other_deepstack_rows_are_the_kept_ones(models, processors):
    model, inputs = models["qwen3_vl"], batch(processors["qwen3_vl"])
    vf = qc.visual_features(model, inputs["pixel_values"], inputs["image_grid_thw"])
    for mechanism in FORWARD_MECHANISMS:
        seen, handle = record_lm(model)
        try:
            _, pk = patched_forward(model, inputs, every_other, mechanism)
        finally:
            handle.remove()
        got = seen[0]
        assert torch.equal(got["visual_pos_masks"], pk.visual_pos_masks)
        # the visual slots hold, in order, each image's kept tokens
        assert torch.equal(got["visual_pos_masks"], pk.input_ids == model.config.image_token_id)
        for level, rows in zip(vf.deepstack, got["deepstack_visual_embeds"]):
            want = torch.cat([f[every_other(f.shape[0])] for f in level])
            assert torch.equal(rows, want.to(rows.dtype))
        vis = got["inputs_embeds"][got["visual_pos_masks"]]
        assert torch.equal(vis, torch.cat([f[every_other(f.shape[0])] for f in vf.features]))


@pytest.mark.parametrize("family", FAMILIES)
def test_mechanisms_agree_at_r_below_one(family, models, processors):
    model, inputs = models[family], batch(processors[family])
    a, pk = patched_forward(model, inputs, every_other, "hook")
    m = pk.attention_mask.bool()
    for mechanism in FORWARD_MECHANISMS[1:]:
        b, _ = patched_forward(model, inputs, every_other, mechanism)
        assert torch.equal(a.logits[m], b.logits[m])


# ------------------------------------------------------------------------------- decode positions


def _decode_positions(model, run):
    seen, handle = record_lm(model)
    try:
        tokens = run()
    finally:
        handle.remove()
    return tokens, [s["position_ids"] for s in seen[1:]]  # the decode steps (after the prefill)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mechanism", GENERATE_MECHANISMS)
def test_generate_decode_positions_continue_at_stock(family, mechanism, models, processors, stock_runs):
    """Whatever is dropped, new token i sits at stock_last + 1 + i (all three axes), as in stock generate."""
    model, inputs = models[family], batch(processors[family])
    ref_tokens, ref_pos = stock_runs[family]
    tokens, pos = _decode_positions(model, lambda: patched_generate(model, inputs, every_other, mechanism, **GEN))
    assert len(pos) == len(ref_pos) == GEN["max_new_tokens"] - 1
    for a, b in zip(pos, ref_pos):
        assert torch.equal(a[-3:], b[-3:])  # rows t, h, w (row 0 of stock's 4-row ids is the 1-D text row)
    stock_pos, _ = qc.stock_position_ids(model, inputs["input_ids"], inputs["image_grid_thw"], inputs["attention_mask"])
    stock_last = stock_pos[:, :, -1]  # (3, B): left padding, so the last column is each row's last prompt token
    assert torch.equal(pos[0][-3:, :, 0], stock_last + 1)
    assert tokens.shape == ref_tokens.shape


def _cache_kwargs(model, cache):
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {name: cache}


def _out_cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


@pytest.mark.parametrize("family", FAMILIES)
def test_hand_written_decoding_loop_uses_rope_deltas(family, models, processors):
    """After a patched prefill (which sets model.model.rope_deltas), a stock decode step without position_ids
    lands at stock's position (cache length + rope_deltas); R = 1 gives stock's logits.

    One unpadded row and no attention_mask in the step: stock 5.24's fallback with a mask
    (``compute_3d_position_ids``) takes positions from the WHOLE mask's cumsum, not its last column, and
    fails for any decode step; without a mask, padded rows would be off by their padding (stock too)."""
    model = models[family]
    inputs = batch(processors[family], GROUPS[:1], PROMPTS[:1])
    nxt = torch.full((1, 1), 9)

    def step(prefill_out):
        return model(input_ids=nxt, **_cache_kwargs(model, _out_cache(prefill_out)))

    seen, handle = record_lm(model)
    try:
        ref = step(model(**inputs, use_cache=True))
        for select in (keep_all, every_other):
            out, pk = patched_forward(model, inputs, select, use_cache=True)
            got = step(out)
            if select is keep_all:
                assert torch.equal(got.logits, ref.logits)
    finally:
        handle.remove()
    decode = [s["position_ids"] for s in seen if s["inputs_embeds"].shape[1] == 1]
    assert len(decode) == 3 and torch.equal(decode[1], decode[0]) and torch.equal(decode[2], decode[0])
    assert int(decode[0].flatten()[0]) == int(pk.stock_position_ids.max()) + 1


# ------------------------------------------------------------------------------------ batch == alone

CASES = [  # every pair of (attention, dtype, padding side) occurs
    ("sdpa", torch.float32, "left"),
    ("sdpa", torch.bfloat16, "right"),
    ("eager", torch.float32, "right"),
    ("eager", torch.bfloat16, "left"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn,dtype,side", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_batch_equals_alone(family, attn, dtype, side):
    """Rows of mixed image sizes (one with two images) give the same logits in a batch as alone: bit for bit
    where stock is (eager: the rows hand the language model their inputs alone bit for bit, and the logits
    differ by no more than the stock language model itself on those inputs), otherwise within stock's own difference."""
    make_model, make_proc = FAMILIES[family]
    model, proc = make_model(attn_implementation=attn, dtype=dtype), make_proc(padding_side=side)
    inputs = batch(proc, BATCH_GROUPS, BATCH_PROMPTS)
    alone = [batch(proc, [g], [p]) for g, p in zip(BATCH_GROUPS, BATCH_PROMPTS)]
    seen, handle = record_lm(model)
    try:
        out, pk = patched_forward(model, inputs, every_other)
        alone_logits = [patched_forward(model, a, every_other)[0].logits[0] for a in alone]
    finally:
        handle.remove()
    assert _side(pk.attention_mask) == side or bool(pk.attention_mask.all())
    rows = valid_rows(out.logits, pk.attention_mask)
    diff = max_row_diff(rows, alone_logits)
    lm_check = stock_lm_check(model, seen[0], seen[1:])
    stock_rows = valid_rows(model(**inputs).logits, inputs["attention_mask"])
    stock_diff = max_row_diff(stock_rows, [model(**a).logits[0] for a in alone])
    assert_batch_like_alone(diff, stock_diff, dtype, attn, lm_check)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_batch_equals_alone(family, models, processors):
    model, proc = models[family], processors[family]
    inputs = batch(proc)
    together = patched_generate(model, inputs, every_other, **GEN)
    for b, (g, p) in enumerate(zip(GROUPS, PROMPTS)):
        assert torch.equal(patched_generate(model, batch(proc, [g], [p]), every_other, **GEN)[0], together[b])


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_expansion_num_return_sequences(family, models, processors):
    """generate's row expansion (beams, num_return_sequences) reaches positions and DeepStack in every mechanism."""
    model, inputs = models[family], batch(processors[family])
    kw = {"max_new_tokens": 3, "do_sample": False, "num_beams": 2, "num_return_sequences": 2}
    ref = stock_generate(model, inputs, **kw)
    for mechanism in GENERATE_MECHANISMS:
        assert torch.equal(patched_generate(model, inputs, keep_all, mechanism, **kw), ref), mechanism


# ------------------------------------------------------------------------------------------ checks


def test_pack_qwen_refuses_inconsistent_inputs(models, processors):
    model, inputs = models["qwen3_vl"], batch(processors["qwen3_vl"])
    vf = qc.visual_features(model, inputs["pixel_values"], inputs["image_grid_thw"])
    kept = [keep_all(f.shape[0]) for f in vf.features]
    args = (model, inputs["input_ids"], inputs["attention_mask"], inputs["image_grid_thw"])
    with pytest.raises(ValueError, match="DeepStack"):
        qc.pack_qwen(*args, vf.features, kept)
    with pytest.raises(ValueError, match="distinct"):
        qc.pack_qwen(*args, vf.features, [torch.zeros(f.shape[0], dtype=torch.long) for f in vf.features], vf.deepstack)
    with pytest.raises(ValueError, match="lie in"):
        qc.pack_qwen(*args, vf.features, [k + 1 for k in kept], vf.deepstack)
    with pytest.raises(ValueError, match="image_grid_thw needs"):
        qc.pack_qwen(
            model,
            inputs["input_ids"][:, 5:],
            inputs["attention_mask"][:, 5:],
            inputs["image_grid_thw"],
            vf.features,
            kept,
            vf.deepstack,
        )
    # rows are reordered by kept index: a shuffled selection packs like the sorted one
    perm = [torch.randperm(k.numel()) for k in kept]
    a = qc.pack_qwen(
        *args,
        [f[p] for f, p in zip(vf.features, perm)],
        [k[p] for k, p in zip(kept, perm)],
        [[lvl[i][p] for i, p in enumerate(perm)] for lvl in vf.deepstack],
    )
    b = qc.pack_qwen(*args, vf.features, kept, vf.deepstack)
    assert torch.equal(a.inputs_embeds, b.inputs_embeds)
    assert torch.equal(a.deepstack_visual_embeds[0], b.deepstack_visual_embeds[0])
    with pytest.raises(ValueError, match="no DeepStack"):
        m25 = models["qwen2_5_vl"]
        i25 = batch(processors["qwen2_5_vl"])
        f25 = qc.visual_features(m25, i25["pixel_values"], i25["image_grid_thw"]).features
        qc.pack_qwen(
            m25,
            i25["input_ids"],
            i25["attention_mask"],
            i25["image_grid_thw"],
            f25,
            [keep_all(f.shape[0]) for f in f25],
            [f25],
        )


# --------------------------------------------------------------------- attention inside the tower


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_attention_received_matches_stock_eager_weights(family, processors, monkeypatch):
    """Scores recomputed from a block's input equal the attention probabilities stock eager attention computes
    in that block (captured per segment: windows or images), mean over heads and queries, mapped from the
    tower's internal order (window order for Qwen2.5-VL) to processor order."""
    import sys

    model = FAMILIES[family][0](attn_implementation="eager")
    out = processors[family].image_processor(images=IMAGES[:2], return_tensors="pt")
    mod = sys.modules[type(model.model.visual.blocks[0].attn).__module__]
    stock_eager, seen = mod.eager_attention_forward, []

    def recording(module, *args, **kwargs):
        o, w = stock_eager(module, *args, **kwargs)
        seen.append((module, w))
        return o, w

    monkeypatch.setattr(mod, "eager_attention_forward", recording)
    vc = model.config.vision_config
    order = qc.patch_order(model, out["image_grid_thw"])
    assert torch.equal(torch.sort(order).values, torch.arange(order.numel()))
    windowed_seen = set()
    for layer in range(vc.depth):
        seen.clear()
        sc = qc.vision_attention_received(model, out["pixel_values"], out["image_grid_thw"], layer)
        attn = model.model.visual.blocks[layer].attn
        received = torch.cat([w[0].float().mean(dim=(0, 1)) for m, w in seen if m is attn])  # tower order
        stock = torch.empty_like(received)
        stock[order] = received
        assert torch.equal(torch.cat(sc.patches), stock)
        m2 = vc.spatial_merge_size**2
        assert torch.equal(torch.cat(sc.tokens), torch.cat(sc.patches).reshape(-1, m2).sum(1))
        if not sc.windowed:  # one segment per image: each image's scores sum to 1
            assert torch.allclose(torch.stack([t.sum() for t in sc.tokens]), torch.ones(2))
        windowed_seen.add(sc.windowed)
    assert windowed_seen == ({True, False} if family == "qwen2_5_vl" else {False})
