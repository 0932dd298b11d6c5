"""The vLLM plugin under tensor and pipeline parallelism (2 ranks, mp executor, CPU), run for real.

One engine per configuration serves every image in one ``generate`` call; each engine runs in its own
process (``vllm_parallel_run.py`` beside this file) with one core per rank (``VLLM_CPU_OMP_THREADS_BIND``: without
it the CPU backend refuses two workers on one NUMA node). The two single-rank engines run side by side,
one core each. About 4 minutes on 2 cores.

Pipeline parallelism needs vLLM's warm-up pass, which ``enforce_eager`` skips on CPU (see the runner);
its engines run Dynamo with the eager backend instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

if os.environ.get("GLOBALCOM2_REQUIRE_VLLM"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

import globalcom2  # noqa: E402
from globalcom2.integrations.vllm import method_config, save_llava_hf_checkpoint  # noqa: E402
from globalcom2.models.llava_next import Geometry  # noqa: E402
from globalcom2.testing.tiny import demo_image, tiny_config, tiny_model, tiny_processor  # noqa: E402

pytestmark = pytest.mark.vllm

RUNNER = Path(__file__).with_name("vllm_parallel_run.py")
PROMPT = "USER: <image>\nwhat is this ? ASSISTANT:"
MAX_TOKENS = 8
COMPRESSED = {"method": "globalcom2", "retention_ratio": 0.25}  # budget="exact": the plugin's default
TINY = {"text_heads": 2}  # head_dim 32: the smallest vLLM's CPU attention supports
SIZES = [(220, 300), (400, 150), (120, 500), (112, 112), (300, 330)]  # (h, w): five grids / paddings
TIMEOUT = 600


def _images():
    return [demo_image(height=h, width=w, seed=i + 1) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return save_llava_hf_checkpoint(
        tiny_model(seed=0, **TINY), tiny_processor(), tmp_path_factory.mktemp("vllm-par") / "tiny"
    )


def _run(ckpt: str, tp: int, pp: int, options: dict | None, bind: str, family: dict | None = None) -> dict:
    """prompt ids and greedy tokens per image from one engine in a fresh process (``family``: arch, prompt)."""
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    spec = json.dumps({"tp": tp, "pp": pp, "options": options, **(family or {})})
    proc = subprocess.run(
        [sys.executable, str(RUNNER), ckpt, spec, json.dumps(SIZES)],
        capture_output=True, text=True, env=env, timeout=TIMEOUT,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"tp={tp} pp={pp} options={options}:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.fixture(scope="module")
def single(ckpt) -> dict:
    """Stock and plugin engines with one rank each, side by side on one core each."""
    with ThreadPoolExecutor(2) as pool:
        stock = pool.submit(_run, ckpt, 1, 1, None, "0")
        plugin = pool.submit(_run, ckpt, 1, 1, COMPRESSED, "1")
        return {"stock": stock.result(), "plugin": plugin.result()}


@pytest.fixture(scope="module")
def hf_tokens() -> list[list[int]]:
    """Greedy new tokens of the HF path (``globalcom2.apply``, budget="exact") per image."""
    model, processor = tiny_model(seed=0, **TINY), tiny_processor()
    globalcom2.apply(model, "globalcom2", budget="exact", retention_ratio=COMPRESSED["retention_ratio"])
    out = []
    for img in _images():
        inputs = processor(images=[img], text=[PROMPT], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        out.append(gen[0, inputs["input_ids"].shape[1] :].tolist())
    return out


def _check_counts(result: dict) -> None:
    cfg = tiny_config(**TINY)
    cfg.globalcom2 = COMPRESSED
    geo, mc = Geometry.from_config(cfg), method_config(cfg)
    for prompt, size in zip(result["prompt_ids"], SIZES):
        k = globalcom2.num_image_tokens(cfg, size, mc)
        assert k < geo.stock_tokens(size)
        assert prompt.count(cfg.image_token_id) == k


def test_single_rank_plugin_matches_hf_path_and_library_counts(single, hf_tokens):
    _check_counts(single["plugin"])
    assert single["plugin"]["tokens"] == hf_tokens
    assert single["plugin"]["tokens"] != single["stock"]["tokens"]  # compression changed what it says
    assert all(len(set(t)) > 1 for t in hf_tokens)  # varied tokens: equality means something
    assert len({len(p) for p in single["plugin"]["prompt_ids"]}) == len(SIZES)  # five sizes, five counts


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_two_ranks_give_single_rank_tokens_stock_and_plugin(ckpt, single, hf_tokens, tp, pp):
    stock = _run(ckpt, tp, pp, None, "0|1")
    assert stock == single["stock"]
    plugin = _run(ckpt, tp, pp, COMPRESSED, "0|1")
    assert plugin == single["plugin"]
    assert plugin["tokens"] == hf_tokens
    _check_counts(plugin)


# ------------------------------------------------------------------ the other families served

FAMILIES = {
    # no video: the tiny checkpoint's video processor keeps its 384 px default, which PP's warm-up profiles
    "llava_onevision": dict(
        arch="GlobalCom2LlavaOnevisionForConditionalGeneration",
        prompt="<image>\nwhat is this ?",
        limit_mm_per_prompt={"image": 1, "video": 0},
    ),
    "internvl": dict(
        arch="GlobalCom2InternVLForConditionalGeneration", prompt="user : <IMG_CONTEXT> what is this ? assistant :"
    ),
}


def _family_model(name: str):
    from globalcom2.testing import tiny_internvl, tiny_onevision

    if name == "llava_onevision":
        return tiny_onevision.tiny_onevision_model(seed=0, **TINY), tiny_onevision.tiny_onevision_processor()
    return tiny_internvl.tiny_internvl_model(seed=0, **TINY), tiny_internvl.tiny_internvl_processor()


def _family_hf_tokens(name: str, options: dict | None) -> list[list[int]]:
    """Greedy new tokens of the HF path per image: stock (``options`` None) or ``globalcom2.apply``."""
    model, processor = _family_model(name)
    if options is not None:
        globalcom2.apply(model, options["method"], budget="exact", retention_ratio=options["retention_ratio"])
    extra = (lambda size: {"image_sizes": [size]}) if name == "internvl" and options is not None else (lambda s: {})
    out = []
    for img, size in zip(_images(), SIZES):
        inputs = processor(images=[img], text=[FAMILIES[name]["prompt"]], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, **extra(size), max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                                 do_sample=False)  # fmt: skip
        out.append(gen[0, inputs["input_ids"].shape[1] :].tolist())
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_served_gives_the_hf_path_tokens_under_tp_and_pp(tmp_path, name):
    """TP = 2 (stock and plugin) and PP = 2 (plugin) equal the HF path's greedy tokens; prompt counts are the library's.

    The single-rank engines of these families equal the HF path too (test_vllm_plugin_families.py), so this is
    TP = 2 == PP = 2 == TP = 1 == the HF path for every family served.
    """
    from globalcom2.budget import stock_image_tokens
    from globalcom2.integrations.vllm import save_vllm_checkpoint

    model, processor = _family_model(name)
    path = save_vllm_checkpoint(model, processor, tmp_path / name)
    fam = FAMILIES[name]
    stock = _run(path, 2, 1, None, "0|1", fam)
    assert stock["tokens"] == _family_hf_tokens(name, None)
    hf = _family_hf_tokens(name, COMPRESSED)
    for tp, pp in ((2, 1), (1, 2)):
        plugin = _run(path, tp, pp, COMPRESSED, "0|1", fam)
        assert plugin["tokens"] == hf, (name, tp, pp)
        cfg = model.config
        for prompt, stock_prompt, size in zip(plugin["prompt_ids"], stock["prompt_ids"], SIZES):
            k = globalcom2.num_image_tokens(cfg, size, "globalcom2", budget="exact", retention_ratio=0.25)
            assert len(prompt) == len(stock_prompt) - stock_image_tokens(cfg, size) + k, (name, size)


QWEN = {
    "qwen2_5_vl": dict(arch="GlobalCom2Qwen2_5_VLForConditionalGeneration", tiny={"text_heads": 2}),
    "qwen3_vl": dict(arch="GlobalCom2Qwen3VLForConditionalGeneration", tiny={"head_dim": 32}),
}


@pytest.mark.parametrize("name", list(QWEN))
def test_qwen_families_give_the_hf_path_tokens_under_tp(tmp_path, name):
    """Qwen2.5-VL / Qwen3-VL at TP = 2, stock and plugin, equal the HF path's greedy tokens (and so TP = 1:
    test_vllm_qwen.py); prompt counts are the library's. PP > 1 is refused at engine start (test_vllm_qwen.py)."""
    from globalcom2.integrations.vllm import save_vllm_checkpoint
    from globalcom2.testing import tiny_qwen

    make = tiny_qwen.tiny_qwen2_5_vl_model if name == "qwen2_5_vl" else tiny_qwen.tiny_qwen3_vl_model
    make_proc = tiny_qwen.tiny_qwen2_5_vl_processor if name == "qwen2_5_vl" else tiny_qwen.tiny_qwen3_vl_processor
    fam = {"arch": QWEN[name]["arch"], "prompt": tiny_qwen.qwen_prompt()}
    path = save_vllm_checkpoint(make(seed=0, **QWEN[name]["tiny"]), make_proc(), tmp_path / name)

    def hf(options):
        model, processor = make(seed=0, **QWEN[name]["tiny"]), make_proc()
        if options is not None:
            globalcom2.apply(model, "globalcom2", budget="exact", retention_ratio=options["retention_ratio"])
        out = []
        for img in _images():
            inputs = processor(images=[img], text=[fam["prompt"]], return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
            out.append(gen[0, inputs["input_ids"].shape[1] :].tolist())
        return out

    stock = _run(path, 2, 1, None, "0|1", fam)
    assert stock["tokens"] == hf(None)
    plugin = _run(path, 2, 1, COMPRESSED, "0|1", fam)
    assert plugin["tokens"] == hf(COMPRESSED)
    assert plugin["tokens"] != stock["tokens"]
    cfg, processor = make(seed=0, **QWEN[name]["tiny"]).config, make_proc()
    for prompt, size in zip(plugin["prompt_ids"], SIZES):
        k = globalcom2.num_image_tokens(cfg, size, "globalcom2", budget="exact", retention_ratio=0.25,
                                        processor=processor)  # fmt: skip
        assert prompt.count(cfg.image_token_id) == k, (name, size)
