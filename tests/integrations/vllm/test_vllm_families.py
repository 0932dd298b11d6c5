"""Stock vLLM serves each family's tiny fp32 checkpoint exactly as transformers runs it.

LLaVA-OneVision, InternVL (HF-native port, served by vLLM's ``InternS1ForConditionalGeneration``),
Qwen2.5-VL and Qwen3-VL: the same random-weight model saved with ``save_vllm_checkpoint``, three images
of mixed sizes in one ``generate`` call, greedy: vLLM's prompt lengths and new tokens equal the HF
model's. One in-process engine per family (10-40 s each on 2 cores).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
if os.environ.get("GLOBALCOM2_REQUIRE_VLLM"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

from globalcom2.integrations.vllm import save_vllm_checkpoint  # noqa: E402
from globalcom2.testing import tiny_internvl, tiny_onevision, tiny_qwen  # noqa: E402
from globalcom2.testing.tiny import demo_image  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8
SIZES = [(220, 300), (400, 150), (120, 500)]  # (height, width)
HEADS2 = {"text_heads": 2}  # head_dim 32: the smallest vLLM's CPU attention supports
FAMILIES = {
    "onevision": (tiny_onevision.tiny_onevision_model, HEADS2, tiny_onevision.tiny_onevision_processor,
                  "<image>\nwhat is this ?"),
    "internvl": (tiny_internvl.tiny_internvl_model, HEADS2, tiny_internvl.tiny_internvl_processor,
                 "user : <IMG_CONTEXT> what is this ? assistant :"),
    "qwen2_5_vl": (tiny_qwen.tiny_qwen2_5_vl_model, HEADS2, tiny_qwen.tiny_qwen2_5_vl_processor,
                   tiny_qwen.qwen_prompt()),
    "qwen3_vl": (tiny_qwen.tiny_qwen3_vl_model, {"head_dim": 32}, tiny_qwen.tiny_qwen3_vl_processor,
                 tiny_qwen.qwen_prompt()),
}  # fmt: skip


def _images():
    return [demo_image(height=h, width=w, seed=i + 1) for i, (h, w) in enumerate(SIZES)]


def _hf(model, processor, prompt) -> list[tuple[int, list[int]]]:
    out = []
    for img in _images():
        inputs = processor(images=[img], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        n = inputs["input_ids"].shape[1]
        out.append((n, gen[0, n:].tolist()))
    return out


def _vllm(path: str, prompt: str) -> list[tuple[int, list[int]]]:
    from vllm import LLM, SamplingParams

    llm = LLM(path, enforce_eager=True, dtype="float32", max_model_len=2048, seed=0, limit_mm_per_prompt={"image": 1})
    try:
        reqs = [{"prompt": prompt, "multi_modal_data": {"image": img}} for img in _images()]
        outs = llm.generate(
            reqs, SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
        )
        return [(len(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]
    finally:
        del llm
        gc.collect()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stock_vllm_equals_transformers(family, tmp_path):
    make_model, kwargs, make_processor, prompt = FAMILIES[family]
    model, processor = make_model(seed=0, **kwargs), make_processor()
    path = save_vllm_checkpoint(model, processor, tmp_path / family)
    hf = _hf(model, processor, prompt)
    assert len({t for _, ts in hf for t in ts}) > 2  # the random model says varied things
    assert _vllm(path, prompt) == hf
