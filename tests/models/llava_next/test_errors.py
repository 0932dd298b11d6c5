"""Bad input gets a clear error naming the argument and the allowed values; the model stays stock."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration

import globalcom2
from conftest import make_inputs
from globalcom2.testing.tiny import demo_image, tiny_config


def _assert_stock(model):
    assert type(model) is LlavaNextForConditionalGeneration
    assert not globalcom2.is_patched(model)


@pytest.mark.parametrize("ratio", [0, -0.1, 1.0001, 2, math.nan, math.inf])
def test_ratio_out_of_range(model, ratio):
    with pytest.raises(ValueError, match=r"retention_ratio must be a finite number in \(0.0, 1.0\]"):
        globalcom2.apply(model, retention_ratio=ratio)
    _assert_stock(model)


@pytest.mark.parametrize("ratio", ["0.5", None, True, [0.5]])
def test_ratio_wrong_type(model, ratio):
    with pytest.raises(TypeError, match="retention_ratio must be a real number"):
        globalcom2.apply(model, retention_ratio=ratio)
    _assert_stock(model)


@pytest.mark.parametrize(
    "option, value, match",
    [
        ("alpha", 1.5, r"alpha must be a finite number in \[0.0, 1.0\]"),
        ("temperature", 0, r"temperature must be a finite number in \(0.0, inf\)"),
        ("score", "probs", r"score must be one of \('logits', 'softmax'\)"),
        ("thumbnail_order", "random", r"thumbnail_order must be one of \('score', 'spatial'\)"),
        ("layout", "x", r"layout must be one of \('authors', 'spatial'\)"),
    ],
)
def test_bad_options(model, option, value, match):
    with pytest.raises(ValueError, match=match):
        globalcom2.apply(model, **{option: value})
    _assert_stock(model)


def test_unknown_option_lists_valid_ones(model):
    with pytest.raises(TypeError, match=r"does not take option\(s\) ratio; valid options: retention_ratio, alpha"):
        globalcom2.apply(model, ratio=0.5)
    _assert_stock(model)


def test_unknown_method_lists_registered_ones(model):
    with pytest.raises(ValueError, match=r"method must be one of \('globalcom2'"):
        globalcom2.apply(model, method="tome")
    _assert_stock(model)


def test_not_a_llava_next_model():
    with pytest.raises(TypeError, match="model must be one of .*LlavaNextForConditionalGeneration.* got Linear"):
        globalcom2.apply(nn.Linear(2, 2))
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = tiny_config()
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=cfg.vision_config, text_config=cfg.text_config))
    with pytest.raises(TypeError, match="got LlavaForConditionalGeneration"):
        globalcom2.apply(llava)
    assert type(llava) is LlavaForConditionalGeneration


def test_unsupported_feature_select_strategy(model):
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'default'.* got 'full'"):
        globalcom2.apply(model)
    _assert_stock(model)


def test_vision_tower_without_cls_token():
    from transformers import LlavaNextConfig, SiglipVisionConfig

    cfg = tiny_config()
    sig = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=112, patch_size=14
    )
    model = LlavaNextForConditionalGeneration(
        LlavaNextConfig(vision_config=sig, text_config=cfg.text_config, image_grid_pinpoints=cfg.image_grid_pinpoints)
    )
    with pytest.raises(TypeError, match=r"no \[CLS\] token"):
        globalcom2.apply(model)
    _assert_stock(model)


def test_images_without_image_sizes(model, processor):
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    inputs.pop("image_sizes")
    globalcom2.apply(model)
    with pytest.raises(ValueError, match="image_sizes is required with pixel_values"):
        model(**inputs)
    with pytest.raises(ValueError, match="image_sizes is required with pixel_values"):
        model.generate(**inputs, max_new_tokens=2)


def test_mismatched_image_sizes_and_pixel_values(model, processor):
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    globalcom2.apply(model)
    bad = dict(inputs, image_sizes=torch.tensor([[200, 300], [100, 100]]))
    with pytest.raises(ValueError, match="pixel_values holds 1 images but image_sizes holds 2"):
        model(**bad)
    bad = dict(inputs, image_sizes=torch.tensor([[100, 700]]))  # a grid with more views than given
    with pytest.raises(ValueError, match="image_sizes|placeholder"):
        model(**bad)
    bad = dict(inputs, pixel_values=inputs["pixel_values"][..., :56, :56])
    with pytest.raises(ValueError, match=r"views must be 112x112 \(vision_config.image_size\)"):
        model(**bad)


def test_placeholder_count_mismatch(model, processor):
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    globalcom2.apply(model)
    ids = inputs["input_ids"].clone()
    ids[0, ids[0] == model.config.image_token_id] = processor.tokenizer.convert_tokens_to_ids("a")
    with pytest.raises(ValueError, match="image placeholder tokens"):
        model(**dict(inputs, input_ids=ids))


def test_position_ids_with_images_are_refused(model, processor):
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    globalcom2.apply(model)
    with pytest.raises(ValueError, match="position_ids cannot be given with pixel_values"):
        model(**inputs, position_ids=torch.arange(inputs["input_ids"].shape[1])[None])


def test_method_must_be_name_or_config(model):
    with pytest.raises(TypeError, match="method must be a method name or a MethodConfig"):
        globalcom2.apply(model, method=0.25)
    _assert_stock(model)


# ---------------------------------------------------------------- odd input (issue 13, section 2)


def _noise_image(width, height, seed=0):
    """Random pixels of any size, down to 1x1 (``demo_image`` needs room for its drawing)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _deep_model(**kwargs):
    """A tiny model deep enough for sparsevlm's three pruning layers."""
    from globalcom2.testing.tiny import tiny_model

    return tiny_model(text_layers=8, **kwargs)


IN_LLM_OPTIONS = {"fastv": {}, "sparsevlm": {"layers": (1, 3, 5)}}


@pytest.mark.parametrize(
    "ratio", [np.float32(0.25), np.float16(0.25), np.float64(0.25), torch.tensor(0.25), Fraction(1, 4), np.array(0.25)]
)
def test_any_real_ratio_type_is_accepted(model, ratio):
    """numbers.Real (NumPy scalars of every width, Fraction) and 0-d real tensors/arrays, like a float."""
    globalcom2.apply(model, retention_ratio=ratio)
    cfg = globalcom2.get_config(model)
    assert type(cfg.retention_ratio) is float and cfg.retention_ratio == 0.25


def test_integer_like_k_is_accepted(model):
    globalcom2.apply(model, method="fastv", k=np.int64(1))
    assert type(globalcom2.get_config(model).k) is int


@pytest.mark.parametrize("ratio", [torch.tensor([0.25]), torch.tensor(True), np.bool_(True), 0.5j])
def test_non_real_ratio_is_a_type_error(model, ratio):
    with pytest.raises(TypeError, match="retention_ratio must be a real number"):
        globalcom2.apply(model, retention_ratio=ratio)
    _assert_stock(model)


def test_abstract_base_config_is_refused_at_apply(model):
    from globalcom2.methods import MethodConfig

    with pytest.raises(TypeError, match="MethodConfig does not implement select .*abstract base"):
        globalcom2.apply(model, MethodConfig())
    _assert_stock(model)


@pytest.mark.parametrize("method", sorted(IN_LLM_OPTIONS))
@pytest.mark.parametrize("how", ["kwarg", "generation_config"])
def test_static_cache_with_in_llm_methods_is_refused_before_any_work(processor, method, how):
    from transformers import GenerationConfig

    model = _deep_model()
    inputs = make_inputs(processor, [demo_image(height=200, width=300), demo_image(height=300, width=200)])
    globalcom2.apply(model, method, retention_ratio=0.5, **IN_LLM_OPTIONS[method])
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    kwargs = {"cache_implementation": "static"}
    if how == "generation_config":
        kwargs = {"generation_config": GenerationConfig(cache_implementation="static", max_new_tokens=2)}
    with pytest.raises(ValueError, match=r"cache_implementation must be one of \(None, 'dynamic'\).*got 'static'"):
        model.generate(**inputs, max_new_tokens=2, **kwargs)
    handle.remove()
    assert calls == []  # refused before the vision tower ran


def test_static_cache_with_vision_side_methods_works(model, processor):
    inputs = make_inputs(processor, [demo_image(height=200, width=300), demo_image(height=300, width=200)])
    globalcom2.apply(model, retention_ratio=0.5)
    dynamic = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    static = model.generate(**inputs, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(dynamic, static)


@pytest.mark.parametrize("method", ["thumbnail_only", "fastv"])
def test_empty_language_model_input_is_a_clear_error(processor, method):
    """Only ``<image>`` in the prompt and a ratio that keeps no image token: nothing is left to run on."""
    model = _deep_model()
    inputs = make_inputs(processor, [demo_image(height=200, width=300)], ["<image>"])
    globalcom2.apply(model, method, retention_ratio=0.001, **IN_LLM_OPTIONS.get(method, {}))
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] of the batch .* no token at all.*retention_ratio"):
        model(**inputs)
    with pytest.raises(ValueError, match=r"no token at all.*retention_ratio"):
        model.generate(**inputs, max_new_tokens=2)
    globalcom2.apply(model, method, retention_ratio=0.5, **IN_LLM_OPTIONS.get(method, {}))
    assert model(**inputs).logits.shape[0] == 1  # a ratio that keeps something works


def test_fastervlm_positive_feature_layer_scores_the_same_layer(model, processor):
    """hidden_states has num_layers + 1 entries: on a 2-layer tower, layer 2 is layer -1."""
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    with torch.no_grad():
        stock_pos = model(**inputs, vision_feature_layer=2).logits
        stock_neg = model(**inputs, vision_feature_layer=-1).logits
    assert torch.equal(stock_pos, stock_neg)
    globalcom2.apply(model, "fastervlm", retention_ratio=0.25)
    with torch.no_grad():
        pos = model(**inputs, vision_feature_layer=2).logits
        neg = model(**inputs, vision_feature_layer=-1).logits
        one = model(**inputs, vision_feature_layer=1).logits
        default = model(**inputs).logits  # config: -2, the same hidden state as 1 here
    assert torch.equal(pos, neg)
    assert torch.equal(one, default)
    with pytest.raises(ValueError, match="vision_feature_layer 0 selects the embeddings"):
        model(**inputs, vision_feature_layer=0)


def test_fastervlm_needs_one_encoder_layer_in_the_config(model):
    model.config.vision_feature_layer = 0
    with pytest.raises(ValueError, match=r"config.vision_feature_layer must be one encoder layer's output"):
        globalcom2.apply(model, "fastervlm")
    _assert_stock(model)


@pytest.mark.parametrize("method", ["thumbnail_only", "globalcom2", "fastervlm", "random"])
def test_degenerate_images_in_one_batch_generate_like_alone(processor, method):
    from globalcom2.testing.tiny import tiny_model

    model = tiny_model()
    imgs = [_noise_image(1000, 3, seed=1), _noise_image(1, 1, seed=2)]
    prompts = ["USER: <image>\nwhat is this ? ASSISTANT:", "USER: <image> describe ASSISTANT:"]
    globalcom2.apply(model, method, retention_ratio=0.5)
    batch = model.generate(**make_inputs(processor, imgs, prompts), max_new_tokens=3, do_sample=False)
    for i in range(2):
        alone = model.generate(**make_inputs(processor, [imgs[i]], [prompts[i]]), max_new_tokens=3, do_sample=False)
        assert torch.equal(batch[i, -3:], alone[0, -3:])


def test_save_pretrained_writes_stock_architecture_and_config_is_untouched(model, processor, tmp_path):
    import json

    before = model.config.to_dict()
    globalcom2.apply(model, retention_ratio=0.25)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert model.config.to_dict() == before  # saving from a patched model changes nothing on it
    assert globalcom2.is_patched(model)
    loaded = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)  # stock loads it
    assert type(loaded) is LlavaNextForConditionalGeneration
    globalcom2.remove(model)
    assert model.config.to_dict() == before
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


@pytest.mark.parametrize("method", ["globalcom2", "fastervlm", "fastv"])
@pytest.mark.parametrize("layer", [3, -4, 99, [-2], (-2, -1), "-2", 1.0, None])
def test_bad_call_time_vision_feature_layer(model, processor, method, layer):
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    globalcom2.apply(model, method)
    if layer is None:  # None means "the config's": fine
        model(**inputs, vision_feature_layer=layer)
        return
    with pytest.raises(ValueError, match=r"vision_feature_layer must be an int in \[-3, 2\].*got"):
        model(**inputs, vision_feature_layer=layer)
    with pytest.raises(ValueError, match=r"vision_feature_layer must be"):
        model.generate(**inputs, vision_feature_layer=layer, max_new_tokens=2)


@pytest.mark.parametrize("method", ["globalcom2", "fastv"])
def test_processor_outputs_from_different_calls(model, processor, method):
    one = make_inputs(processor, [demo_image(height=200, width=300)])
    two = make_inputs(processor, [demo_image(height=200, width=300), demo_image(height=300, width=200)])
    wide = make_inputs(processor, [demo_image(height=100, width=400)])
    globalcom2.apply(model, method)
    with pytest.raises(ValueError, match="pixel_values holds 2 images but image_sizes holds 1"):
        model(**dict(one, pixel_values=two["pixel_values"]))
    with pytest.raises(ValueError, match="pass input_ids, pixel_values and image_sizes from the same processor call"):
        model(**dict(one, image_sizes=wide["image_sizes"], pixel_values=wide["pixel_values"]))
    no_image = processor(text=["USER: what is this ? ASSISTANT:"], return_tensors="pt")
    with pytest.raises(ValueError, match="input_ids hold 0 image placeholder tokens"):
        model(**dict(one, input_ids=no_image["input_ids"], attention_mask=no_image["attention_mask"]))
    with pytest.raises(ValueError, match="image_sizes must be a \\(number of images, 2\\) array"):
        model(**dict(one, image_sizes=torch.tensor([200, 300, 4])))
    with pytest.raises(ValueError, match="image_sizes must be a \\(number of images, 2\\) array"):
        model(**dict(one, image_sizes=torch.tensor([[[200, 300]]])))
    with pytest.raises(ValueError, match="vision_feature_select_strategy must be 'default'"):
        model(**one, vision_feature_select_strategy="full")


@pytest.mark.parametrize("delta", [-1, 1])
def test_labels_of_the_wrong_length(model, processor, delta):
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    ids = inputs["input_ids"]
    labels = torch.cat([ids, ids[:, :1]], dim=1) if delta > 0 else ids[:, :-1]
    with pytest.raises(ValueError):  # stock refuses too
        model(**inputs, labels=labels)
    globalcom2.apply(model)
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(1, \d+\), got \(1, \d+\)"):
        model(**inputs, labels=labels)


def test_max_length_not_above_the_prompt_names_max_length(model, processor):
    from transformers import GenerationConfig

    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    n = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="max_length"):  # stock refuses as well
        model.generate(**inputs, max_length=n)
    globalcom2.apply(model)
    with pytest.raises(ValueError, match=rf"max_length \({n}\) must be greater than the prompt length \({n} "):
        model.generate(**inputs, max_length=n)
    with pytest.raises(ValueError, match=r"generation_config.max_length \(3\) must be greater"):
        model.generate(**inputs, generation_config=GenerationConfig(max_length=3))
    assert model.generate(**inputs, max_length=n + 2, do_sample=False).shape[1] == n + 2


def test_loss_when_no_label_survives_compression_is_nan_like_stock(model, processor):
    """Labels on image placeholders have no counterpart after compression and are dropped; with
    nothing left the loss is nan, as stock's loss is when every label is ignored (-100)."""
    inputs = make_inputs(processor, [demo_image(height=200, width=300)], ["<image> what"])
    is_img = inputs["input_ids"] == model.config.image_token_id
    labels = torch.where(is_img, inputs["input_ids"], -100)  # only placeholders carry labels
    with torch.no_grad():
        assert torch.isnan(model(**inputs, labels=torch.full_like(labels, -100)).loss)  # stock
        globalcom2.apply(model, retention_ratio=0.5)
        assert torch.isnan(model(**inputs, labels=labels).loss)
        text_labels = torch.where(is_img, -100, inputs["input_ids"])
        assert torch.isfinite(model(**inputs, labels=text_labels).loss)
