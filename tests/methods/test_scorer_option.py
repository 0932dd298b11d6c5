"""The ``scorer`` option of the [CLS]-based methods, and its wiring in the LLaVA-NeXT adapter."""

import pytest
import torch
import torch.nn.functional as F

import globalcom2
from conftest import encode, make_inputs
from globalcom2.core import scoring
from globalcom2.methods import REGISTRY
from globalcom2.models import llava_next as A
from globalcom2.testing.tiny import demo_image, tiny_model

#: every method whose selection reads the views' token ratings (the "[CLS]-based" ones)
SCORED = sorted(n for n, cls in REGISTRY.items() if "scorer" in cls.option_names())


def test_every_cls_based_method_takes_scorer():
    expected = {"globalcom2", "fastervlm", "visionzip", "random", "uniform", "ntopk", "softmax_max"}
    expected |= {"softmax_sum", "local_only", "global_only", "global_local", "thumbnail_only", "crops_only"}
    expected |= {"drop_random_crop", "drop_important_crop", "drop_unimportant_crop"}
    assert set(SCORED) == expected
    for name in SCORED:
        assert globalcom2.make_config(name).scorer == "auto"
        for s in scoring.SCORER_CHOICES:
            assert globalcom2.make_config(name, scorer=s).scorer == s


@pytest.mark.parametrize("name", ["globalcom2", "fastervlm", "visionzip", "thumbnail_only", "random"])
def test_bad_scorer_is_a_value_error_naming_the_option(name):
    with pytest.raises(ValueError, match=r"scorer must be one of \('auto', 'cls', 'attention_received'"):
        globalcom2.make_config(name, scorer="max")


def test_methods_without_token_ratings_do_not_take_scorer():
    with pytest.raises(TypeError, match="does not take option"):
        globalcom2.make_config("divprune", scorer="cls")


def _eager_tower_outputs(model, inputs):
    tower = model.model.vision_tower
    impl = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return tower(inputs["pixel_values"][0], output_attentions=True, output_hidden_states=True)
    finally:
        tower.config._attn_implementation = impl


@pytest.mark.parametrize("layer", [-1, -2])
def test_scorers_equal_their_definitions_on_the_eager_attention(processor, layer):
    model = tiny_model(attn_implementation="eager")
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    out = _eager_tower_outputs(model, inputs)
    pv, sizes = inputs["pixel_values"], inputs["image_sizes"]
    got = {
        s: encode(model, pv, sizes, score="softmax", score_layer=layer, scorer=s)[1][0]
        for s in ("cls", "attention_received", "global_dissimilarity", "auto")
    }
    probs = out.attentions[layer].mean(1)  # (V, T, T) head-averaged
    assert torch.allclose(got["cls"], probs[:, 0, 1:], atol=1e-6)
    assert torch.equal(got["auto"], got["cls"])  # CLIP has a [CLS] token
    assert torch.allclose(got["attention_received"], probs.mean(1)[:, 1:], atol=1e-6)
    tokens = out.hidden_states[layer][:, 1:]  # (V, N, D) the layer's output patches
    expected = -F.cosine_similarity(tokens, tokens.mean(1, keepdim=True), dim=-1)
    assert torch.allclose(got["global_dissimilarity"], expected, atol=1e-6)


def test_scorer_changes_the_selection_and_runs_end_to_end(model, processor):
    inputs = make_inputs(
        processor, [demo_image(height=220, width=300, seed=1), demo_image(height=400, width=150, seed=2)]
    )
    pv, sizes = inputs["pixel_values"], inputs["image_sizes"]
    recs = {}
    for s in ("auto", "cls", "attention_received", "global_dissimilarity"):
        cfg = globalcom2.make_config("globalcom2", retention_ratio=0.25, scorer=s)
        recs[s] = A.compress(model, cfg, pv, sizes)[1]
    for a, b in zip(recs["auto"], recs["cls"]):
        assert torch.equal(a.order, b.order)  # default: token-identical to the [CLS] path
    assert not torch.equal(recs["cls"][0].order, recs["attention_received"][0].order)
    assert not torch.equal(recs["cls"][0].order, recs["global_dissimilarity"][0].order)
    globalcom2.apply(model, retention_ratio=0.25, scorer="global_dissimilarity", budget="exact")
    out = model(**inputs)
    assert out.logits.isfinite().all()


@pytest.mark.parametrize("name", ["fastervlm", "visionzip"])
def test_feature_layer_methods_score_the_feature_layer(processor, name):
    model = tiny_model(attn_implementation="eager")
    inputs = make_inputs(processor, [demo_image(height=200, width=300)])
    out = _eager_tower_outputs(model, inputs)
    cfg = globalcom2.make_config(name, retention_ratio=0.3, scorer="attention_received")
    recs = A.compress(model, cfg, inputs["pixel_values"], inputs["image_sizes"])[1]
    layer = model.config.vision_feature_layer  # -2: fastervlm and visionzip rank by the feature layer
    expected = out.attentions[layer].mean(1).mean(1)[:, 1:]
    assert torch.allclose(recs[0].scores, expected, atol=1e-6)


def test_vllm_plugin_refuses_scorers_it_does_not_compute():
    from globalcom2.integrations.vllm import method_config
    from globalcom2.testing.tiny import tiny_config

    cfg = tiny_config()
    cfg.globalcom2 = {"retention_ratio": 0.25, "scorer": "cls"}
    assert method_config(cfg).scorer == "cls"
    cfg.globalcom2 = {"retention_ratio": 0.25, "scorer": "attention_received"}
    with pytest.raises(
        ValueError, match="scorer='attention_received': the vLLM plugin for this model rates tokens by their"
    ):
        method_config(cfg)
