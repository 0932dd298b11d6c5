"""One layer index for scores and keys: ``hidden_states[i]`` is the output of encoder layer ``i - 1``, and both the
scores and the keys of index i come from that layer (a positive ``vision_feature_layer`` once read the keys of the
layer after the one whose attention rated the tokens)."""

from __future__ import annotations

import pytest
import torch

from globalcom2.core.layers import HiddenIndex
from globalcom2.core.scoring import f32_linear, head_mean_keys
from globalcom2.models import towers
from globalcom2.testing import demo_image, tiny_model, tiny_processor


def test_hidden_index_names_the_producing_layer_and_its_input():
    assert HiddenIndex.of(-1, 4) == HiddenIndex(4, 4) and HiddenIndex.of(-1, 4).layer == 3
    assert HiddenIndex.of(2, 4).layer == 1 and HiddenIndex.of(2, 4).layer_input == 1
    assert HiddenIndex.of(-2, 4).layer == HiddenIndex.of(3, 4).layer == 2
    with pytest.raises(ValueError, match="vision_feature_layer 0 selects the embeddings"):
        _ = HiddenIndex.of(0, 4).layer
    with pytest.raises(ValueError, match=r"vision_feature_layer must be an int in \[-5, 4\]"):
        HiddenIndex.of(5, 4)


@pytest.mark.parametrize("index", [1, 2, 3, -1, -2, -3])
def test_keys_come_from_the_layer_whose_attention_rates_the_tokens(index):
    model = tiny_model(vision_layers=3)
    inputs = tiny_processor()(images=demo_image(300, 220), text="<image>", return_tensors="pt")
    tower = model.model.vision_tower
    pv = inputs["pixel_values"][0]
    with torch.no_grad():
        hs = tower(pv, output_hidden_states=True, return_dict=True).hidden_states
        layer = towers.encoder_layers(tower)[HiddenIndex.of(index, 3).layer]
        x = layer.layer_norm1(hs[HiddenIndex.of(index, 3).layer_input])
        want = head_mean_keys(f32_linear(layer.self_attn.k_proj, x), layer.self_attn.num_heads)
        got = towers.layer_keys(tower, hs, index)
        assert torch.equal(got, want)
        # the [CLS] scores of the same index read the same layer: recompute them from its q/k
        q = f32_linear(layer.self_attn.q_proj, x[:, 0]) * layer.self_attn.scale
        k = f32_linear(layer.self_attn.k_proj, x)
        from globalcom2.core import cls_attention

        assert torch.allclose(towers.tower_scores(tower, hs, "cls", "logits", index), cls_attention(q, k, 4), atol=0)
