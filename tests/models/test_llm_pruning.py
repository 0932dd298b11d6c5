"""The in-LLM pruning hooks do no more work than they must (issue 12: no in-LLM method slower than stock).

Behaviour, not wall-clock time: which modules run how often and which masks the layers receive.
"""

import pytest
import torch

import globalcom2
from conftest import PROMPT, make_inputs
from globalcom2.testing.tiny import demo_image, tiny_model


def _kwargs_of(layer, seen):
    return layer.register_forward_hook(lambda m, a, kw, o: seen.append(dict(kw)), with_kwargs=True)


@pytest.mark.parametrize("name", ["fastv", "dart"])
def test_the_layer_before_the_pruning_layer_projects_its_keys_once(processor, name):
    model = tiny_model(text_layers=4)
    inputs = make_inputs(processor, [demo_image(height=220, width=300)])
    calls = []
    hook = model.model.language_model.layers[1].self_attn.k_proj.register_forward_hook(
        lambda m, a, o: calls.append(a[0].shape[1])
    )
    globalcom2.apply(model, name, retention_ratio=0.25, k=2)
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    assert calls == [inputs["input_ids"].shape[1]]  # the layer's own call only; its output is reused


def test_sdpa_pruned_layers_run_causally_without_a_mask_unless_keys_are_padding(processor, images):
    model = tiny_model(text_layers=4)
    globalcom2.apply(model, "fastv", retention_ratio=0.25)
    seen = []
    hook = _kwargs_of(model.model.language_model.layers[3], seen)
    with torch.no_grad():
        model.generate(**make_inputs(processor, images[:1]), max_new_tokens=2, do_sample=False)
        assert [kw["attention_mask"] for kw in seen] == [None, None]  # prefill and a decoding step
        seen.clear()
        model(**make_inputs(processor, images[:2], [PROMPT, "USER: <image>\nwhat ? ASSISTANT:"]))
    hook.remove()
    assert seen[0]["attention_mask"] is not None  # rows of different lengths: left padding is masked
    eager = tiny_model(text_layers=4, attn_implementation="eager")
    globalcom2.apply(eager, "fastv", retention_ratio=0.25)
    seen.clear()
    hook = _kwargs_of(eager.model.language_model.layers[3], seen)
    with torch.no_grad():
        eager(**make_inputs(processor, images[:1]))
    hook.remove()
    assert seen[0]["attention_mask"].dtype == torch.float32  # eager needs the additive causal mask


def test_decoding_builds_one_mask_per_stage_and_step(processor, images):
    model = tiny_model(text_layers=5, attn_implementation="eager")
    globalcom2.apply(model, "fastv", retention_ratio=0.25)
    seen = [[], []]
    hooks = [_kwargs_of(model.model.language_model.layers[i], seen[j]) for j, i in enumerate((3, 4))]
    with torch.no_grad():
        model.generate(**make_inputs(processor, images[:2]), max_new_tokens=3, do_sample=False)
    for h in hooks:
        h.remove()
    for a, b in zip(seen[0][1:], seen[1][1:]):  # decoding steps of two layers of the same stage
        assert a["attention_mask"] is b["attention_mask"]


def test_a_stage_that_keeps_every_token_leaves_the_layers_stock(processor, images):
    model = tiny_model(text_layers=4)
    inputs = make_inputs(processor, images[:2], [PROMPT, "USER: <image>\nwhat ? ASSISTANT:"])
    globalcom2.apply(model, "fastv", retention_ratio=1.0)
    seen = [[], []]
    hooks = [_kwargs_of(model.model.language_model.layers[i], seen[j]) for j, i in enumerate((0, 2))]
    with torch.no_grad():
        model(**inputs)
    for h in hooks:
        h.remove()
    (first,), (pruning_layer,) = seen
    assert first["attention_mask"] is not None  # left padding: the stock model's own mask
    for key in ("attention_mask", "position_embeddings", "position_ids"):
        assert pruning_layer[key] is first[key]  # nothing rebuilt: the stock model's own inputs
