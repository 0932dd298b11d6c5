"""LLaVA-OneVision in the tools: num_image_tokens, ``globalcom2 flops --config``, the lmms-eval plugin."""

import json

import pytest
import torch

import globalcom2
from globalcom2.models import llava_onevision as O
from globalcom2.testing.tiny import demo_image
from globalcom2.testing.tiny_onevision import tiny_onevision_config, tiny_onevision_model, tiny_onevision_processor
from globalcom2.tools import flops


def test_num_image_tokens_accepts_the_config_and_the_model():
    config = tiny_onevision_config()
    model = tiny_onevision_model()
    geo = O.Geometry.from_config(config)
    for size in [(220, 300), (500, 500), (40, 1000), (1000, 40)]:
        n = globalcom2.num_image_tokens(config, size, retention_ratio=0.25, budget="exact")
        assert n == globalcom2.num_image_tokens(model, size, retention_ratio=0.25, budget="exact")
        assert n < geo.stock_tokens(size)
    with pytest.raises(ValueError, match="method 'visionzip' does not run on LLaVA-OneVision"):
        globalcom2.num_image_tokens(config, (220, 300), "visionzip")
    with pytest.raises(ValueError, match="prunes inside the language model"):
        globalcom2.num_image_tokens(config, (220, 300), "fastv")


def test_flops_config_of_a_onevision_checkpoint(tmp_path, capsys):
    config = tiny_onevision_config()
    config.save_pretrained(tmp_path)
    assert flops.main(["--config", str(tmp_path), "--image-size", "500", "500", "--ratios", "1", "0.25",
                       "--methods", "globalcom2", "fastervlm", "fastv", "visionzip"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    text = config.text_config
    assert f"L={text.num_hidden_layers}, d={text.hidden_size}, m={text.intermediate_size}" in out
    geo = O.Geometry.from_config(config)
    stock = geo.stock_tokens((500, 500))
    assert "(llava_onevision geometry)" in out
    kept = globalcom2.num_image_tokens(config, (500, 500), retention_ratio=0.25, budget="exact")
    assert f"globalcom2 R=0.25  stock {stock} -> {kept} (budget='exact')" in out
    assert "visionzip" in out and "does not run on LLaVA-OneVision" in out
    assert "fastv R=0.25  stock" in out and "inside the language model" in out
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "llava_onevision"


def test_lmms_eval_plugin_loads_a_onevision_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    import transformers
    from test_lmms_eval import _requests

    from globalcom2.integrations.lmms_eval.plugin import GlobalCom2LlavaNext

    tiny_onevision_model().save_pretrained(tmp_path)
    # the stock OneVision processor needs torchvision for its video processor; the tiny one is images-only
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *a, **k: tiny_onevision_processor())
    lm = GlobalCom2LlavaNext.create_from_arg_string(
        f"pretrained={tmp_path},method=globalcom2,retention_ratio=0.25", {"device": "cpu"}
    )
    assert type(lm.model).__name__ == "GlobalCom2LlavaOnevisionForConditionalGeneration"
    assert globalcom2.get_config(lm.model).layout == "spatial"  # the OneVision layout of GlobalCom²
    gen = {"max_new_tokens": 3, "temperature": 0, "do_sample": False}
    items = [
        (demo_image(height=220, width=300, seed=1), "what is this ?", dict(gen)),
        (demo_image(height=500, width=60), "how ?", dict(gen)),
    ]
    out = lm.generate_until(_requests(lm, "generate_until", items))
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    with torch.no_grad():
        lm_stock = GlobalCom2LlavaNext.create_from_arg_string(f"pretrained={tmp_path},method=none", {"device": "cpu"})
    assert type(lm_stock.model) is transformers.LlavaOnevisionForConditionalGeneration
