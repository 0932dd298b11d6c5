"""Bad input gets a clear error naming the argument and the allowed values; the model stays stock."""

import math

import pytest
import torch
from torch import nn
from transformers import LlavaNextForConditionalGeneration

import globalcom2
from conftest import make_inputs
from globalcom2.tiny import demo_image, tiny_config


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
    inputs = make_inputs(processor, [demo_image(300, 200)])
    inputs.pop("image_sizes")
    globalcom2.apply(model)
    with pytest.raises(ValueError, match="image_sizes is required with pixel_values"):
        model(**inputs)
    with pytest.raises(ValueError, match="image_sizes is required with pixel_values"):
        model.generate(**inputs, max_new_tokens=2)


def test_mismatched_image_sizes_and_pixel_values(model, processor):
    inputs = make_inputs(processor, [demo_image(300, 200)])
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
    inputs = make_inputs(processor, [demo_image(300, 200)])
    globalcom2.apply(model)
    ids = inputs["input_ids"].clone()
    ids[0, ids[0] == model.config.image_token_id] = processor.tokenizer.convert_tokens_to_ids("a")
    with pytest.raises(ValueError, match="image placeholder tokens"):
        model(**dict(inputs, input_ids=ids))


def test_position_ids_with_images_are_refused(model, processor):
    inputs = make_inputs(processor, [demo_image(300, 200)])
    globalcom2.apply(model)
    with pytest.raises(ValueError, match="position_ids cannot be given with pixel_values"):
        model(**inputs, position_ids=torch.arange(inputs["input_ids"].shape[1])[None])


def test_method_must_be_name_or_config(model):
    with pytest.raises(TypeError, match="method must be a method name or a MethodConfig"):
        globalcom2.apply(model, method=0.25)
    _assert_stock(model)
