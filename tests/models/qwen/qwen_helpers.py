"""Helpers of the Qwen-VL tests: tiny Qwen2.5-VL / Qwen3-VL models and processors, batches, LM recorders
(imported by name: a second conftest.py would shadow tests/conftest.py for `from conftest import`)."""

from __future__ import annotations

import pytest
import torch

from globalcom2.models import qwen_common as qc
from globalcom2.testing import (
    demo_image,
    qwen_prompt,
    tiny_qwen2_5_vl_model,
    tiny_qwen2_5_vl_processor,
    tiny_qwen3_vl_model,
    tiny_qwen3_vl_processor,
)

QWEN = {
    "qwen2_5_vl": (tiny_qwen2_5_vl_model, tiny_qwen2_5_vl_processor),
    "qwen3_vl": (tiny_qwen3_vl_model, tiny_qwen3_vl_processor),
}
IMAGES = [
    demo_image(height=100, width=140, seed=1),
    demo_image(height=150, width=60, seed=2),
    demo_image(height=100, width=100, seed=3),
]
PROMPTS = [qwen_prompt(), qwen_prompt("what color is the sky ?", n_images=2)]
GROUPS = [[IMAGES[0]], [IMAGES[1], IMAGES[2]]]  # row 0: one image; row 1: two images of other sizes


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread (the machine's cores are shared; restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_grad():
    """Inference mode for every test (no autograd graph of the tiny models)."""
    with torch.no_grad():
        yield


def prepare(model, inputs):
    """The patched model's ``ImageBatch`` for ``inputs`` (its records and extras), as its forward computes it."""
    from globalcom2 import get_config
    from globalcom2.models import adapter_for

    adapter = adapter_for(model)
    vision = {k: inputs[k] for k in adapter.vision_kwargs if k in inputs}
    return adapter.prepare_images(
        model, get_config(model), inputs["pixel_values"], vision, inputs["input_ids"], inputs.get("attention_mask")
    )


def qwen_batch(processor, groups=GROUPS, prompts=PROMPTS):
    """The processor's output for ``groups`` of images, one prompt per group, padded."""
    return processor(images=[im for g in groups for im in g], text=prompts, return_tensors="pt", padding=True)


class _Restore:
    def __init__(self, module):
        self.module = module

    def remove(self):
        del self.module.forward


def record_lm(model):
    """Every language-model call's inputs as its ``forward`` receives them (after every pre-hook)."""
    seen = []
    lm = qc.base_model(model).language_model
    stock = lm.forward

    def forward(*args, **kw):
        keys = ("inputs_embeds", "attention_mask", "position_ids", "visual_pos_masks", "deepstack_visual_embeds")
        seen.append({k: kw.get(k) for k in keys})
        return stock(*args, **kw)

    lm.forward = forward
    return seen, _Restore(lm)


def valid_rows(x, mask):
    """Per row, the entries of x: (B, L, ...) at the attended slots of mask: (B, L)."""
    return [x[b][mask[b].bool()] for b in range(x.shape[0])]


#: rows of mixed image sizes for batch == alone: one image, two images of other sizes, one more size
BATCH_GROUPS = [*GROUPS, [demo_image(height=60, width=120, seed=4)]]
BATCH_PROMPTS = [*PROMPTS, qwen_prompt("where ?")]


def max_row_diff(rows, alone) -> float:
    """Largest |difference| between each batch row's valid logits ``rows[b]`` and the same prompt's logits alone."""
    return max((r.float() - a.float()).abs().max().item() for r, a in zip(rows, alone))


def _row_inputs(seen: dict, b: int) -> list[torch.Tensor]:
    """Row ``b`` of one recorded language-model call as that row alone would receive it: its embeddings and
    positions at the attended slots, then its DeepStack rows (Qwen3-VL)."""
    keep = seen["attention_mask"][b].bool()
    row = [seen["inputs_embeds"][b][keep], seen["position_ids"][..., b, :][..., keep]]
    vpm = seen["visual_pos_masks"]
    if vpm is not None:
        start = int(vpm[:b].sum())
        row += [d[start : start + int(vpm[b].sum())] for d in seen["deepstack_visual_embeds"]]
    return row


def stock_lm_check(model, batch_seen: dict, alone_seen: list[dict]) -> tuple[bool, float]:
    """What the patched model hands its (untouched) language model, batch vs alone: whether every row's inputs
    equal that row's inputs alone bit for bit, and the largest logits difference that the stock language model
    itself gives between those exact inputs in the batch and alone. That difference is stock's own kernel
    behaviour at the compressed lengths (a shorter padded batch can take other BLAS blockings than stock's
    longer one); the patched model's batch-vs-alone difference is measured against it."""
    lm = qc.base_model(model).language_model

    def logits(seen):
        return model.lm_head(lm(**{k: v for k, v in seen.items() if v is not None}).last_hidden_state)

    pairs = [(_row_inputs(batch_seen, b), _row_inputs(one, 0)) for b, one in enumerate(alone_seen)]
    equal = all(len(x) == len(y) and all(map(torch.equal, x, y)) for x, y in pairs)
    together = valid_rows(logits(batch_seen), batch_seen["attention_mask"])
    return equal, max_row_diff(together, [logits(one)[0] for one in alone_seen])


def assert_batch_like_alone(diff: float, stock_diff: float, dtype, attn: str, lm_check: tuple[bool, float]) -> None:
    """Every row hands the language model its inputs alone bit for bit (``lm_check``, from :func:`stock_lm_check`).
    Under eager attention the logits then differ by no more than the stock language model's own difference on those
    very inputs (zero wherever stock's kernels are batch-invariant at those lengths); under SDPA within twice stock's
    own batch-vs-alone difference plus the dtype's noise (SDPA runs a padded batch with an explicit mask and a row
    alone causally, different kernels: stock is bitwise only where its rows happen to need no padding mask)."""
    inputs_equal, lm_diff = lm_check
    assert inputs_equal
    if attn == "eager":
        assert diff <= lm_diff, (diff, lm_diff)
    else:
        assert diff <= 2 * stock_diff + (1e-5 if dtype == torch.float32 else 0.15)
