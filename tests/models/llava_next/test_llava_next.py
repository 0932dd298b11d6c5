"""Level 2: the real adapter end to end on tiny random LLaVA-NeXT models built from configs here."""

import random

import pytest
import torch
from transformers import LlavaNextForConditionalGeneration

import globalcom2
from conftest import PROMPT, encode, lm_inputs, make_inputs
from globalcom2.models import llava_next as A
from globalcom2.testing.tiny import demo_image, tiny_model, tiny_processor
from oracles.reference_authors import reference_tokens

# ---------------------------------------------------------------- fidelity to the authors' code


def _check_against_reference(model, processor, cases):
    geo = A.Geometry.from_config(model.config)
    newline = model.model.image_newline.detach()
    for (w, h), ratio in cases:
        inputs = processor(images=demo_image(height=h, width=w, seed=w * 7 + h), text="<image>", return_tensors="pt")
        cfg = globalcom2.make_config("globalcom2", retention_ratio=ratio)
        feats, _ = A.compress(model, cfg, inputs["pixel_values"], inputs["image_sizes"])
        views, scores, sizes = encode(model, inputs["pixel_values"], inputs["image_sizes"])
        nph, npw = geo.grid(sizes[0])
        ref = reference_tokens(views[0], scores[0], nph, npw, sizes[0], ratio, newline)
        assert ref.shape == feats[0].shape, ((w, h), ratio)
        assert torch.equal(ref, feats[0]), ((w, h), ratio)


def _random_cases(seed, n):
    rng = random.Random(seed)
    ratios = [1.0, 0.75, 0.5, 0.25, 0.1]
    return [
        ((rng.randint(24, 700), rng.randint(24, 700)), rng.choice(ratios + [rng.uniform(0.01, 1)])) for _ in range(n)
    ]


def test_default_matches_authors_code_token_for_token(model, processor):
    _check_against_reference(model, processor, _random_cases(0, 25))


def test_reference_match_with_fully_padded_crops_and_uneven_grids():
    # a 2x3 / 3x2-only model: thin images leave whole crop columns as padding
    pins = [[224, 336], [336, 224]]
    model, processor = tiny_model(pinpoints=pins), tiny_processor(pinpoints=pins)
    cases = [((60, 500), 0.5), ((40, 640), 0.25), ((500, 60), 0.75), ((333, 222), 0.1), ((90, 300), 1.0)]
    _check_against_reference(model, processor, cases)


def test_geometry_is_read_from_config():
    # 16 px patches on 64 px views (S = 4), nothing like 336/14/24
    pins = [[64, 128], [128, 64], [128, 128]]
    model = tiny_model(image_size=64, patch_size=16, pinpoints=pins)
    processor = tiny_processor(image_size=64, patch_size=16, pinpoints=pins)
    _check_against_reference(model, processor, _random_cases(1, 8))
    inputs = make_inputs(processor, [demo_image(height=90, width=200)])
    globalcom2.apply(model, retention_ratio=0.5)
    assert model(**inputs).logits.isfinite().all()


def test_cls_scores_equal_eager_attention_of_last_layer(processor):
    model = tiny_model(attn_implementation="eager")
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    pv = inputs["pixel_values"][0]
    with torch.no_grad():
        out = model.model.vision_tower(pv, output_attentions=True, output_hidden_states=True)
    expected = out.attentions[-1].mean(1)[:, 0, 1:]  # softmax probs, head mean, [CLS] row
    _, scores, _ = encode(model, inputs["pixel_values"], inputs["image_sizes"], score="softmax")
    assert torch.allclose(scores[0], expected, atol=1e-6)


def test_softmax_score_option_changes_ranking_source(model, processor):
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    a = A.compress(model, globalcom2.make_config(score="logits"), inputs["pixel_values"], inputs["image_sizes"])[1]
    b = A.compress(model, globalcom2.make_config(score="softmax"), inputs["pixel_values"], inputs["image_sizes"])[1]
    # same budget for the thumbnail, the scores (and usually the picks) differ
    assert a[0].selection.thumb_keep.numel() == b[0].selection.thumb_keep.numel()
    assert not torch.equal(a[0].scores, b[0].scores)


# ---------------------------------------------------------------- stock processor outputs


def test_forward_feeds_shortened_sequence(model, processor):
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    ratio = 0.25
    globalcom2.apply(model, retention_ratio=ratio)
    seen, handle = lm_inputs(model)
    _, recs = A.compress(model, globalcom2.get_config(model), inputs["pixel_values"], inputs["image_sizes"])
    out = model(**inputs)
    handle.remove()
    embeds, mask, positions = seen[0]
    n_text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    assert embeds.shape[1] == n_text + recs[0].num_tokens < inputs["input_ids"].shape[1]
    assert mask.shape == embeds.shape[:2] and bool(mask.all())
    assert torch.equal(positions[0], torch.arange(embeds.shape[1]))
    assert out.logits.shape[1] == embeds.shape[1]


def test_stock_layout_at_ratio_one_reproduces_stock_model(model, processor):
    """R = 1 with uniform allocation and the spatial layout hands the LLM exactly stock's tokens."""
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        stock = model(**inputs).logits
    globalcom2.apply(model, retention_ratio=1.0, allocation="uniform", layout="spatial", thumbnail_order="spatial")
    with torch.no_grad():
        ours = model(**inputs).logits
    handle.remove()
    assert torch.equal(seen[0][0], seen[1][0])
    assert torch.allclose(stock, ours, atol=1e-5)


def test_generate_idiom_returns_prompt_then_new_tokens(model, processor):
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    globalcom2.apply(model, retention_ratio=0.25)
    with torch.no_grad():
        first = model(**inputs).logits[:, -1].argmax(-1)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    n_prompt = inputs["input_ids"].shape[1]
    assert torch.equal(out[:, :n_prompt], inputs["input_ids"])
    new = out[:, n_prompt:]
    assert 1 <= new.shape[1] <= 4
    assert torch.equal(new[:, 0], first)  # generate and forward agree on the compressed prompt


def test_generate_max_length_counts_the_uncompressed_prompt(model, processor):
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    globalcom2.apply(model, retention_ratio=0.25)
    n_prompt = inputs["input_ids"].shape[1]
    out = model.generate(**inputs, max_length=n_prompt + 3, do_sample=False, eos_token_id=None)
    assert out.shape[1] == n_prompt + 3
    out = model.generate(**inputs, max_new_tokens=2, do_sample=False, eos_token_id=None, return_dict_in_generate=True)
    assert out.sequences.shape[1] == n_prompt + 2


def test_batch_of_mixed_sizes_matches_each_sample_alone(model, processor, images):
    prompts = [PROMPT, "USER: <image>\nhow many ? ASSISTANT:", "USER: <image>\ndescribe the picture please ASSISTANT:"]
    globalcom2.apply(model, retention_ratio=0.25)
    batch = make_inputs(processor, images, prompts)
    out = model.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None)
    n_prompt = batch["input_ids"].shape[1]
    for i, (img, prompt) in enumerate(zip(images, prompts)):
        single = make_inputs(processor, [img], [prompt])
        alone = model.generate(**single, max_new_tokens=5, do_sample=False, eos_token_id=None)
        assert torch.equal(alone[0, single["input_ids"].shape[1] :], out[i, n_prompt:]), i


def test_forward_batch_matches_single_logits(model, processor, images):
    """Each row of a batch gets the logits it gets alone, whatever the compressed lengths come out at."""
    globalcom2.apply(model, retention_ratio=0.5)
    long_prompt = "USER: <image>\nwhat color is the sky in the picture on the left ? ASSISTANT:"
    # two different images (their compressed lengths depend on the random weights and may be equal), and one
    # image twice with prompts of different lengths: identical visual tokens, so the rows surely need padding
    cases = [(images[:2], [PROMPT, "USER: <image>\nwhat color ? ASSISTANT:"]), ([images[0]] * 2, [PROMPT, long_prompt])]
    for case, (imgs, prompts) in enumerate(cases):
        seen, handle = lm_inputs(model)
        with torch.no_grad():
            logits = model(**make_inputs(processor, imgs, prompts)).logits[:, -1]
        handle.remove()
        _, mask, positions = seen[0]
        if case == 1:
            assert not bool(mask.all())  # left padding is exercised
        assert torch.equal(positions[mask.bool()], torch.cat([torch.arange(int(m.sum())) for m in mask]))
        with torch.no_grad():
            for i, (image, prompt) in enumerate(zip(imgs, prompts)):
                alone = model(**make_inputs(processor, [image], [prompt])).logits[:, -1]
                assert torch.allclose(alone[0], logits[i], atol=1e-5), (case, i)


def test_labels_are_shortened_with_the_sequence(model, processor):
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    globalcom2.apply(model, retention_ratio=0.25)
    out = model(**inputs, labels=labels)
    assert out.loss is not None and out.loss.isfinite()
    out.loss.backward()  # gradients reach the projector through the kept features, as in stock
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_kernels_and_dtypes(processor, images, attn, dtype):
    model = tiny_model(attn_implementation=attn, dtype=dtype)
    inputs = make_inputs(processor, images[:2], [PROMPT, PROMPT])
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    globalcom2.apply(model, retention_ratio=0.25)
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.dtype == dtype and out.logits.isfinite().all()
    gen = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 2


def test_eager_and_sdpa_select_the_same_tokens(processor, images):
    cfg = globalcom2.make_config(retention_ratio=0.25)
    inputs = make_inputs(processor, images, [PROMPT] * 3)
    orders = []
    for attn in ("eager", "sdpa"):
        model = tiny_model(attn_implementation=attn)
        _, recs = A.compress(model, cfg, inputs["pixel_values"], inputs["image_sizes"])
        orders.append([r.order for r in recs])
    for a, b in zip(*orders):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- patch hygiene


def test_remove_gives_bit_identical_logits(processor):
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    model, twin = tiny_model(seed=3), tiny_model(seed=3)
    with torch.no_grad():
        twin(**inputs)  # warm-up: first calls may pick other kernels
        model(**inputs)
        never = twin(**inputs).logits
        globalcom2.apply(model, retention_ratio=0.25)
        model(**inputs)
        model.generate(**inputs, max_new_tokens=2)
        globalcom2.remove(model)
        after = model(**inputs).logits
    assert torch.equal(never, after)
    assert type(model) is LlavaNextForConditionalGeneration
    assert not globalcom2.is_patched(model) and globalcom2.get_config(model) is None
    assert set(vars(model)) == set(vars(twin))


def test_apply_twice_reconfigures_without_double_patching(model, processor):
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    globalcom2.apply(model, retention_ratio=0.5)
    cls = type(model)
    globalcom2.apply(model, retention_ratio=0.1)
    assert type(model) is cls
    assert sum(c.__name__.startswith("GlobalCom2") for c in type(model).__mro__) == 1
    assert globalcom2.get_config(model).retention_ratio == 0.1
    seen, handle = lm_inputs(model)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    _, recs = A.compress(
        model, globalcom2.make_config(retention_ratio=0.1), inputs["pixel_values"], inputs["image_sizes"]
    )
    n_text = int((inputs["input_ids"] != model.config.image_token_id).sum())
    assert seen[0][0].shape[1] == n_text + recs[0].num_tokens
    globalcom2.remove(model)
    assert type(model) is LlavaNextForConditionalGeneration


def test_other_instances_and_library_class_untouched(processor):
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    stock_forward = LlavaNextForConditionalGeneration.forward
    stock_generate = LlavaNextForConditionalGeneration.generate
    patched, other = tiny_model(seed=5), tiny_model(seed=5)
    with torch.no_grad():
        other(**inputs)
        before = other(**inputs).logits
        globalcom2.apply(patched, retention_ratio=0.25)
        patched(**inputs)
        after = other(**inputs).logits
    assert torch.equal(before, after)
    assert type(other) is LlavaNextForConditionalGeneration
    assert LlavaNextForConditionalGeneration.forward is stock_forward
    assert LlavaNextForConditionalGeneration.generate is stock_generate


def test_text_only_calls_pass_through(model, processor):
    tok = processor.tokenizer
    ids = tok(["what is this ?"], return_tensors="pt")
    with torch.no_grad():
        ref = model(**ids).logits
        globalcom2.apply(model, retention_ratio=0.25)
        ours = model(**ids).logits
    assert torch.equal(ref, ours)
    assert model.generate(**ids, max_new_tokens=2).shape[1] <= ids["input_ids"].shape[1] + 2


def test_forward_signature_stays_visible(model):
    import inspect

    stock = inspect.signature(LlavaNextForConditionalGeneration.forward)
    globalcom2.apply(model)
    assert inspect.signature(type(model).forward) == stock


def test_pack_moves_labels_with_their_tokens(model, processor):
    inputs = make_inputs(
        processor,
        [demo_image(height=220, width=300), demo_image(height=400, width=150)],
        [PROMPT, "USER: <image>\nhow ? ASSISTANT:"],
    )
    labels = inputs["input_ids"].clone()
    img = model.config.image_token_id
    feats, recs = A.compress(model, globalcom2.make_config(), inputs["pixel_values"], inputs["image_sizes"])
    geo = A.Geometry.from_config(model.config)
    counts = [geo.stock_tokens(r.image_size) for r in recs]
    packed = A.pack(model, inputs["input_ids"], inputs["attention_mask"], feats, counts, labels=labels)
    for b in range(2):
        real = inputs["attention_mask"][b].bool()
        text = labels[b][real & (labels[b] != img)]
        ((start, end),) = packed.image_spans[b]
        got = packed.labels[b][packed.attention_mask[b].bool()]
        assert (packed.labels[b, start:end] == -100).all() and end - start == recs[b].num_tokens
        assert torch.equal(got[got != -100], text)
