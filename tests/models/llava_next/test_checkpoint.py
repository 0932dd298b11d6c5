"""Level 3: a real LLaVA-NeXT checkpoint, only when one is present locally.

Set GLOBALCOM2_CHECKPOINT to a local llava-hf LLaVA-NeXT directory (nothing is downloaded).
"""

import os

import pytest
import torch

import globalcom2
from globalcom2.models import llava_next as A
from globalcom2.testing.tiny import demo_image

CHECKPOINT = os.environ.get("GLOBALCOM2_CHECKPOINT")
pytestmark = [
    pytest.mark.checkpoint,
    pytest.mark.skipif(not CHECKPOINT, reason="set GLOBALCOM2_CHECKPOINT to a local LLaVA-NeXT checkpoint"),
]


@pytest.fixture(scope="module")
def real():
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    processor = AutoProcessor.from_pretrained(CHECKPOINT, local_files_only=True)
    model = LlavaNextForConditionalGeneration.from_pretrained(CHECKPOINT, dtype=dtype, local_files_only=True)
    return model.to(device).eval(), processor, device


def _inputs(processor, device, images, question="What is in this image?"):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
    return processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True).to(device)


def test_real_checkpoint_token_budget_and_generate(real):
    model, processor, device = real
    inputs = _inputs(processor, device, [demo_image(height=480, width=672)])
    geo = A.Geometry.from_config(model.config)
    stock = geo.stock_tokens(tuple(inputs["image_sizes"][0].tolist()))
    for ratio in (0.5, 0.1):
        _, recs = A.compress(
            model, globalcom2.make_config(retention_ratio=ratio), inputs["pixel_values"], inputs["image_sizes"]
        )
        assert recs[0].num_tokens < stock
    globalcom2.apply(model, retention_ratio=0.25)
    try:
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        text = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text.strip()
    finally:
        globalcom2.remove(model)


def test_real_checkpoint_batch_matches_single(real):
    model, processor, device = real
    images = [demo_image(height=480, width=672, seed=1), demo_image(height=900, width=300, seed=2)]
    globalcom2.apply(model, retention_ratio=0.25)
    try:
        batch = _inputs(processor, device, images)
        out = model.generate(**batch, max_new_tokens=6, do_sample=False)
        for i, img in enumerate(images):
            single = _inputs(processor, device, [img])
            alone = model.generate(**single, max_new_tokens=6, do_sample=False)
            assert alone[0, single["input_ids"].shape[1] :].tolist() == out[i, batch["input_ids"].shape[1] :].tolist()
    finally:
        globalcom2.remove(model)
