"""The vLLM plugin's glue that needs no vLLM: option parsing, checkpoint layout, benchmark table.

These run in the main suite; the engine-level tests are in test_vllm.py (marker ``vllm``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import globalcom2.integrations.vllm as plugin
from conftest import encode
from globalcom2.integrations.vllm import bench, method_config, save_llava_hf_checkpoint
from globalcom2.integrations.vllm.checkpoint import llava_hf_state_dict
from globalcom2.models import towers
from globalcom2.testing.tiny import tiny_config, tiny_model, tiny_processor


def test_importing_the_plugin_does_not_import_vllm():
    import subprocess
    import sys

    code = "import sys, globalcom2, globalcom2.integrations.vllm; print('vllm' in sys.modules)"
    import globalcom2

    src = str(Path(globalcom2.__file__).resolve().parents[1])  # the globalcom2 under test, not another install
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "False"
    assert callable(plugin.register)


def test_method_config_forces_exact_budget_and_rejects_what_vllm_cannot_serve():
    cfg = tiny_config()
    assert method_config(cfg).budget == "exact"  # no key: GlobalCom² defaults, count made size-only
    cfg.globalcom2 = {"retention_ratio": 0.25}
    assert method_config(cfg) == globalcom2_cfg(retention_ratio=0.25, budget="exact")
    cfg.globalcom2 = {"method": "fastervlm", "retention_ratio": 0.25}
    assert method_config(cfg).name == "fastervlm"
    cfg.globalcom2 = {"budget": "authors"}
    with pytest.raises(ValueError, match="budget='exact'"):
        method_config(cfg)
    cfg.globalcom2 = {"budget": "authors", "allocation": "uniform"}  # size-only already: served as asked
    assert method_config(cfg).budget == "authors"
    cfg.globalcom2 = {"method": "fastv"}
    with pytest.raises(ValueError, match="inside the language model"):
        method_config(cfg)
    cfg.globalcom2 = {"retention_ratio": 0.25, "alpah": 0.5}
    with pytest.raises(TypeError, match="alpah"):
        method_config(cfg)
    cfg.globalcom2 = {"retention_ratio": 1.5}
    with pytest.raises(ValueError, match="retention_ratio"):
        method_config(cfg)
    cfg.globalcom2 = {"method": "nope"}
    with pytest.raises(ValueError, match="method must be one of"):
        method_config(cfg)
    for bad in ("globalcom2", ["globalcom2"]):
        cfg.globalcom2 = bad
        with pytest.raises(TypeError, match="dict"):
            method_config(cfg)


def globalcom2_cfg(**options):
    from globalcom2 import make_config

    return make_config("globalcom2", **options)


def test_checkpoint_uses_the_llava_hf_layout(tmp_path):
    from safetensors import safe_open

    model = tiny_model(seed=0)
    path = save_llava_hf_checkpoint(model, tiny_processor(), tmp_path / "ckpt")
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        names = set(f.keys())
        newline = f.get_tensor("image_newline")
    last = tiny_config().vision_config.num_hidden_layers - 1
    assert f"vision_tower.vision_model.encoder.layers.{last}.self_attn.q_proj.weight" in names
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in names
    assert "language_model.lm_head.weight" in names
    assert not any(n.startswith(("vision_tower.embeddings", "model.")) for n in names)
    assert len(names) == len(model.state_dict())
    assert torch.equal(newline, model.model.image_newline)
    assert json.load(open(os.path.join(path, "config.json")))["architectures"] == ["LlavaNextForConditionalGeneration"]
    assert os.path.exists(os.path.join(path, "tokenizer.json"))
    assert set(llava_hf_state_dict(model)) == names


def test_bench_table_and_arguments():
    rows = [
        dict(config="stock", visual_tokens_mean=2346.0, requests_per_s=0.1, ttft_mean_s=10.0, output_tokens_per_s=1.0),
        dict(config="globalcom2 R=0.25", visual_tokens_mean=624.0, requests_per_s=0.3, ttft_mean_s=5.0,
             output_tokens_per_s=3.0),
    ]  # fmt: skip
    for r in rows:
        r.update(requests_per_s_vs_stock=r["requests_per_s"] / 0.1, ttft_vs_stock=r["ttft_mean_s"] / 10.0)
        r["eq8_prefill_flops_ratio"] = 1.0 if r["config"] == "stock" else 4.02
    table = bench.format_table({"rows": rows})
    assert "| globalcom2 R=0.25 | 624 | 0.300 | 5.00 | 3.00 | 3.00x | 0.50x | 4.02x |" in table
    for argv in (["--requests", "0"], ["--ratios", "0"], ["--ratios", "1.5"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
    shape = bench.model_shape(2, 2)
    assert (shape["vision_hidden"], shape["text_hidden"], shape["text_intermediate"]) == (1024, 4096, 11008)


# ---------------------------------------------------------------- the newer methods (issue 12) in vLLM


def test_methods_that_read_the_prompt_are_refused_at_engine_start():
    cfg = tiny_config()
    refused = [
        {"method": "cdpruner"},
        {"method": "dart", "retention_ratio": 0.3, "form": "embedding"},
        {"method": "composed", "selector": "cdpruner"},
        {"method": "composed", "selector": "dart", "budget": "exact"},
    ]
    for raw in refused:
        cfg.globalcom2 = raw
        with pytest.raises(ValueError, match=r"against the prompt's text embeddings \(text\); vLLM computes an image"):
            method_config(cfg)
    cfg.globalcom2 = {"method": "composed", "selector": "dart"}
    with pytest.raises(ValueError, match=r"method 'composed' with selector='dart'"):
        method_config(cfg)
    served = {
        "divprune": "authors",  # size-only already: served as asked
        "visionzip": "authors",
    }
    for name, budget in served.items():
        cfg.globalcom2 = {"method": name, "budget": budget}
        assert method_config(cfg).name == name
    cfg.globalcom2 = {"method": "composed", "selector": "divprune"}
    assert method_config(cfg).budget == "exact"  # GlobalCom²'s allocation: made size-only as for globalcom2


@pytest.mark.parametrize(
    "name,options",
    [
        ("globalcom2", {"budget": "exact"}),
        ("fastervlm", {}),
        ("visionzip", {}),
        ("divprune", {}),
        ("divprune", {"granularity": "view"}),
        ("composed", {"selector": "visionzip", "budget": "exact"}),
        ("composed", {"selector": "divprune", "allocation": "uniform"}),
    ],
)
def test_vllm_selection_glue_gives_the_hf_tokens(name, options):
    from globalcom2 import make_config, num_image_tokens
    from globalcom2.integrations.vllm.select import image_tokens
    from globalcom2.models import llava_next as A
    from globalcom2.testing.tiny import demo_image

    model, processor = tiny_model(seed=0), tiny_processor()
    imgs = [demo_image(height=220, width=300, seed=1), demo_image(height=400, width=150, seed=2)]
    inputs = processor(
        images=imgs, text=["<image>"] * 2, return_tensors="pt", input_data_format="channels_last", padding=True
    )
    cfg = make_config(name, retention_ratio=0.4, **options)
    with torch.no_grad():
        ref, recs = A.compress(model, cfg, inputs["pixel_values"], inputs["image_sizes"])
        layer, kind = cfg.requires.score_layer, cfg.requires.score
        feats, scores, sizes, hs = encode(
            model, inputs["pixel_values"], inputs["image_sizes"], score=kind, score_layer=layer, return_hidden=True
        )
        n_views = [f.shape[0] for f in feats]
        feature_layer = model.config.vision_feature_layer
        hidden = list(hs[feature_layer].split(n_views))  # what the vLLM model hands over
        score_layer = feature_layer if layer is None else layer
        keys = list(towers.layer_keys(model.model.vision_tower, hs, score_layer).split(n_views))
        geo = A.Geometry.from_config(model.config)
        out = image_tokens(
            cfg, geo, feats, scores, sizes, model.model.image_newline, model.model.multi_modal_projector, hidden, keys
        )
    for o, r, size in zip(out, ref, sizes):
        assert torch.equal(o, r)
        assert o.shape[0] == num_image_tokens(model.config, size, cfg)


# ---------------------------------------------------------------- the other families' checkpoints and options


def test_vllm_checkpoints_use_the_layouts_vllm_loads(tmp_path):
    from safetensors import safe_open

    from globalcom2.integrations.vllm import save_vllm_checkpoint
    from globalcom2.testing import tiny_internvl, tiny_onevision, tiny_qwen

    cases = {
        "onevision": (tiny_onevision.tiny_onevision_model, tiny_onevision.tiny_onevision_processor,
                      "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight", "LlavaOnevisionProcessor"),
        "internvl": (tiny_internvl.tiny_internvl_model, tiny_internvl.tiny_internvl_processor,
                     "vision_tower.encoder.layer.0.attention.q_proj.weight", "InternVLProcessor"),
        "qwen2_5_vl": (tiny_qwen.tiny_qwen2_5_vl_model, tiny_qwen.tiny_qwen2_5_vl_processor,
                       "visual.blocks.0.attn.qkv.weight", "Qwen2_5_VLProcessor"),
        "qwen3_vl": (tiny_qwen.tiny_qwen3_vl_model, tiny_qwen.tiny_qwen3_vl_processor,
                     "model.visual.deepstack_merger_list.0.norm.weight", "Qwen3VLProcessor"),
    }  # fmt: skip
    for name, (make_model, make_processor, key, processor_class) in cases.items():
        model = make_model(seed=0)
        path = save_vllm_checkpoint(model, make_processor(), tmp_path / name)
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            names = set(f.keys())
        assert key in names, (name, sorted(names)[:5])
        assert len(names) == len(model.state_dict())
        if name == "onevision":  # the llava-hf tower names (save_pretrained drops ``vision_model.``)
            assert not any(n.startswith("vision_tower.embeddings") for n in names)
        cfg_path = os.path.join(path, "processor_config.json")
        if os.path.exists(cfg_path):  # with torchvision: the whole processor, under its stock class
            assert json.load(open(cfg_path))["processor_class"] == processor_class
        assert os.path.exists(os.path.join(path, "tokenizer.json"))


def test_method_config_takes_the_family_scorers():
    from globalcom2.tiny_internvl import tiny_internvl_config
    from globalcom2.tiny_onevision import tiny_onevision_config

    cfg = tiny_config()
    cfg.globalcom2 = {"scorer": "attention_received"}
    with pytest.raises(ValueError, match="by their \\[CLS\\] attention"):
        method_config(cfg)
    ov = tiny_onevision_config()
    ov.globalcom2 = {"scorer": "attention_received", "retention_ratio": 0.25}
    assert method_config(ov, ("auto", "global_dissimilarity", "attention_received")).scorer == "attention_received"
    with pytest.raises(ValueError, match="scorer='cls'"):
        ov.globalcom2 = {"scorer": "cls"}
        method_config(ov, ("auto", "global_dissimilarity", "attention_received"))
    iv = tiny_internvl_config()  # image_size is a [h, w] pair there
    iv.globalcom2 = {"retention_ratio": 0.25}
    assert method_config(iv).budget == "exact"


def test_tiny_qwen_models_generate_varied_tokens():
    from globalcom2.testing import tiny_qwen
    from globalcom2.testing.tiny import demo_image

    for make_model, make_processor in ((tiny_qwen.tiny_qwen2_5_vl_model, tiny_qwen.tiny_qwen2_5_vl_processor),
                                       (tiny_qwen.tiny_qwen3_vl_model, tiny_qwen.tiny_qwen3_vl_processor)):  # fmt: skip
        model, processor = make_model(seed=0), make_processor()
        inputs = processor(
            images=[demo_image(height=400, width=150, seed=2)], text=[tiny_qwen.qwen_prompt()], return_tensors="pt"
        )
        assert int(inputs["image_grid_thw"].prod()) // 4 == int(
            (inputs["input_ids"] == model.config.image_token_id).sum()
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        assert len(set(out[0, inputs["input_ids"].shape[1] :].tolist())) > 1
