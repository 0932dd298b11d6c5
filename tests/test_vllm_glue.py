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
from globalcom2.integrations.vllm import bench, method_config, save_llava_hf_checkpoint
from globalcom2.integrations.vllm.checkpoint import llava_hf_state_dict
from globalcom2.tiny import tiny_config, tiny_model, tiny_processor


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
