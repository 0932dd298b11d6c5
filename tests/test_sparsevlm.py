"""SparseVLM: raters, clustering, schedule on hand-made tensors; token counts per layer end to end."""

import pytest
import torch

import globalcom2
from conftest import PROMPT, make_inputs
from globalcom2.methods.sparsevlm import SparseVLMConfig, cluster_means, rater_positions
from globalcom2.tiny import demo_image, tiny_model


def test_raters_are_text_after_the_image_above_mean_relevance():
    # 1 text, 2 visual, 3 text tokens; visual embeddings point along x, text token 4 too
    e = torch.tensor([[0, 1.0], [1, 0], [1, 0], [0, 1], [5, 0], [0, 1]])
    visual = torch.tensor([False, True, True, False, False, False])
    pos = torch.arange(6)
    raters = rater_positions(e, torch.ones(6, dtype=torch.bool), visual, pos)
    assert raters.tolist() == [4]  # token 0 is before the image and never rates


def test_cluster_means_finds_two_blobs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=g) * 0.01 + 5
    b = torch.randn(5, 4, generator=g) * 0.01 - 5
    means = cluster_means(torch.cat([a, b]), 2)
    got = sorted(means[:, 0].tolist())
    assert got == pytest.approx([b[:, 0].mean().item(), a[:, 0].mean().item()], abs=1e-5)


def test_schedule_hits_the_average_ratio_and_shrinks():
    for ratio in (0.75, 0.5, 0.25, 0.1):
        cfg = SparseVLMConfig(retention_ratio=ratio)
        counts = cfg.stage_counts(2880, 32)
        assert list(counts) == sorted(counts, reverse=True)
        avg = (2 * 2880 + 4 * counts[0] + 9 * counts[1] + 17 * counts[2]) / 32 / 2880
        assert avg == pytest.approx(ratio, abs=1e-3)
    # the released 192-token schedule (576 tokens, 32 layers) is an anchor: 300/200/110 kept + recycled
    released = SparseVLMConfig(retention_ratio=(2 * 576 + 4 * 300 + 9 * 200 + 17 * 110) / 32 / 576)
    assert released.stage_counts(576, 32) == (300, 200, 110)
    keep, rec = released.split(576, 300)
    assert keep + rec == 300 and rec == SparseVLMConfig.recycled(576 - keep)


def test_bad_layers_and_depth(model):
    with pytest.raises(ValueError, match="layers must be three strictly increasing"):
        SparseVLMConfig(layers=(6, 2, 15))
    with pytest.raises(ValueError, match=r"layers must all be < 2 for a language model with 3 layers"):
        globalcom2.apply(model, method="sparsevlm")
    assert not globalcom2.is_patched(model)


def test_visual_tokens_per_layer_follow_the_schedule(processor):
    model = tiny_model(text_layers=8)
    inputs = make_inputs(processor, [demo_image(300, 220)])
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    n_text = inputs["input_ids"].shape[1] - n_img
    cfg = SparseVLMConfig(retention_ratio=0.25, layers=(1, 3, 5))
    globalcom2.apply(model, cfg)
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, out, i=i: seen.append(out.shape[1]))
             for i, layer in enumerate(model.model.language_model.layers)]  # fmt: skip
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    c = cfg.stage_counts(n_img, 8)
    # layers 0-1 see everything, 2-3 stage 1, 4-5 stage 2, 6-7 stage 3
    assert seen == [n_img + n_text] * 2 + [c[0] + n_text] * 2 + [c[1] + n_text] * 2 + [c[2] + n_text] * 2
    # R is the layer average as SparseVLM's schedule counts it: [0, 1) full, [1, 3), [3, 5), [5, 8) stages
    avg = (1 * n_img + 2 * c[0] + 2 * c[1] + 3 * c[2]) / 8 / n_img
    assert avg == pytest.approx(0.25, abs=0.01)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batch_matches_alone_and_generate(processor, images, attn):
    model = tiny_model(text_layers=8, attn_implementation=attn)
    globalcom2.apply(model, method="sparsevlm", retention_ratio=0.5, layers=(1, 3, 5))
    prompts = [PROMPT, "USER: <image>\nhow many dogs are there ? ASSISTANT:", PROMPT]
    batch = make_inputs(processor, images, prompts)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None)
    n = batch["input_ids"].shape[1]
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        single = make_inputs(processor, [img], [prompt])
        alone = model.generate(**single, max_new_tokens=4, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], out[i, n:])


def test_bf16_and_remove(processor, images):
    model, twin = tiny_model(text_layers=8, dtype=torch.bfloat16), tiny_model(text_layers=8, dtype=torch.bfloat16)
    inputs = make_inputs(processor, images[:2], [PROMPT, PROMPT])
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        twin(**inputs)
        ref = twin(**inputs).logits
        globalcom2.apply(model, method="sparsevlm", retention_ratio=0.25, layers=(1, 3, 5))
        assert model(**inputs).logits.isfinite().all()
        model.generate(**inputs, max_new_tokens=2)
        globalcom2.remove(model)
        assert torch.equal(model(**inputs).logits, ref)
