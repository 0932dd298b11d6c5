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
    return [demo_image(w, h, seed=i + 1) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return save_llava_hf_checkpoint(
        tiny_model(seed=0, **TINY), tiny_processor(), tmp_path_factory.mktemp("vllm-par") / "tiny"
    )


def _run(ckpt: str, tp: int, pp: int, options: dict | None, bind: str) -> dict:
    """prompt ids and greedy tokens per image from one engine in a fresh process."""
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    spec = json.dumps({"tp": tp, "pp": pp, "options": options})
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
