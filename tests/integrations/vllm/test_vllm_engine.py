"""The vLLM plugin end to end on the tiny fp32 checkpoint: offline ``LLM.generate`` and ``vllm serve``.

Needs vLLM (``scripts/vllm-setup.sh`` builds a venv with the CPU build); skipped where it is absent.
Each engine takes 10-90 s to start on a small CPU machine, so engines are module-scoped.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default asks for most of the machine
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: starts several times faster
if os.environ.get("GLOBALCOM2_REQUIRE_VLLM"):  # .ci/run: a broken vLLM install fails instead of skipping
    import vllm
else:
    vllm = pytest.importorskip("vllm")

import globalcom2  # noqa: E402
from globalcom2.integrations.vllm import ARCHITECTURE, method_config, register, save_llava_hf_checkpoint  # noqa: E402
from globalcom2.models.llava_next import Geometry  # noqa: E402
from globalcom2.testing.tiny import demo_image, tiny_config, tiny_model, tiny_processor  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPT = "USER: <image>\nwhat is this ? ASSISTANT:"
MAX_TOKENS = 8
COMPRESSED = {"method": "globalcom2", "retention_ratio": 0.25}  # budget="exact" is forced by the plugin
NEUTRAL = {"method": "globalcom2", "retention_ratio": 1.0, "thumbnail_order": "spatial", "layout": "spatial"}
TINY = {"text_heads": 2}  # head_dim 32: the smallest vLLM's CPU attention supports
SIZES = [(220, 300), (400, 150), (120, 500)]  # (height, width): three AnyRes grids and paddings


def _images():
    return [demo_image(height=h, width=w, seed=i + 1) for i, (h, w) in enumerate(SIZES)]


def _overrides(options: dict) -> dict:
    return {"architectures": [ARCHITECTURE], "globalcom2": options}


def _llm(path: str, options: dict | None):
    from vllm import LLM

    return LLM(
        path,
        hf_overrides=None if options is None else _overrides(options),
        enforce_eager=True,
        dtype="float32",
        max_model_len=2048,
        seed=0,
        limit_mm_per_prompt={"image": 1},
    )


def _generate(llm, imgs) -> list[tuple[list[int], list[int], str]]:
    """(prompt token ids, greedy new token ids, text) per image, all images in one batch."""
    from vllm import SamplingParams

    reqs = [{"prompt": PROMPT, "multi_modal_data": {"image": img}} for img in imgs]
    outs = llm.generate(reqs, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids), o.outputs[0].text) for o in outs]


def _close(llm) -> None:
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """The tiny random LLaVA-NeXT (fp32) with its processor, saved in the llava-hf weight layout."""
    return save_llava_hf_checkpoint(
        tiny_model(seed=0, **TINY), tiny_processor(), tmp_path_factory.mktemp("vllm") / "tiny"
    )


@pytest.fixture(scope="module")
def stock(ckpt):
    """Stock vLLM LLaVA-NeXT on the batch of mixed sizes."""
    llm = _llm(ckpt, None)
    try:
        return _generate(llm, _images())
    finally:
        _close(llm)


@pytest.fixture(scope="module")
def neutral(ckpt, stock):
    """The plugin at R = 1 with neutral options, same batch."""
    llm = _llm(ckpt, NEUTRAL)
    try:
        return _generate(llm, _images())
    finally:
        _close(llm)


@pytest.fixture(scope="module")
def compressed(ckpt, neutral):
    """The plugin engine at R = 0.25 (kept for several tests)."""
    llm = _llm(ckpt, COMPRESSED)
    yield llm
    _close(llm)


def _hf_tokens(options: dict, img) -> list[int]:
    """Greedy new tokens of the HF path (``globalcom2.apply`` with budget="exact") for one image."""
    model, processor = tiny_model(seed=0, **TINY), tiny_processor()
    opts = {k: v for k, v in options.items() if k != "method"}
    globalcom2.apply(model, options["method"], budget="exact", **opts)
    inputs = processor(images=[img], text=[PROMPT], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


# ------------------------------------------------------------------------------------------ plugin


def test_register_is_idempotent_and_entry_point_is_declared():
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    register()
    register()
    assert ARCHITECTURE in ModelRegistry.get_supported_archs()
    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("globalcom2") == "globalcom2.integrations.vllm:register"


def test_processing_info_count_is_remembered_per_size_and_follows_the_options():
    from globalcom2.integrations.vllm.llava_next import GlobalCom2LlavaNextProcessingInfo

    cfg = tiny_config(**TINY)
    cfg.globalcom2 = dict(COMPRESSED)
    info = object.__new__(GlobalCom2LlavaNextProcessingInfo)  # no vLLM context: only the count is asked
    info.get_hf_config = lambda: cfg
    count = lambda h, w: info.get_num_image_tokens(image_width=w, image_height=h)
    expected = [globalcom2.num_image_tokens(cfg, s, method_config(cfg)) for s in SIZES]
    assert [count(*s) for s in SIZES + SIZES] == expected * 2
    cache = info._globalcom2_counts
    assert list(cache._counts) == SIZES  # parsed once, one entry per size
    first = cache._counts[SIZES[0]]
    cfg.globalcom2 = {**COMPRESSED, "retention_ratio": 0.1}  # other options: parsed and counted again
    k = count(*SIZES[0])
    assert list(cache._counts) == [SIZES[0]]
    assert k == globalcom2.num_image_tokens(cfg, SIZES[0], method_config(cfg)) < first


# ------------------------------------------------------------------------------------------ offline


def test_ratio_one_neutral_options_give_stock_vllm_tokens(stock, neutral):
    assert [p for p, _, _ in neutral] == [p for p, _, _ in stock]
    assert [t for _, t, _ in neutral] == [t for _, t, _ in stock]


def test_prompt_tokens_are_the_library_count(stock, compressed):
    cfg = tiny_config(**TINY)
    geo, image_token = Geometry.from_config(cfg), cfg.image_token_id
    cfg.globalcom2 = COMPRESSED
    out = _generate(compressed, _images())
    for (prompt, _, _), (stock_prompt, _, _), size in zip(out, stock, SIZES):
        k = globalcom2.num_image_tokens(cfg, size, method_config(cfg))
        assert k < geo.stock_tokens(size)
        assert prompt.count(image_token) == k
        assert len(prompt) == len(stock_prompt) - geo.stock_tokens(size) + k


def test_greedy_tokens_equal_the_hf_path(compressed, stock):
    out = _generate(compressed, _images())
    for (_, tokens, _), img in zip(out, _images()):
        assert tokens == _hf_tokens(COMPRESSED, img)
        assert len(set(tokens)) > 1  # the random model says varied things, so equal tokens mean something
    assert [t for _, t, _ in out] != [t for _, t, _ in stock]  # and compression changed what it says


def test_mixed_batch_gives_each_request_its_own_result(compressed):
    imgs = _images()
    batch = _generate(compressed, imgs)
    alone = [_generate(compressed, [img])[0] for img in imgs]
    assert batch == alone
    assert len({len(p) for p, _, _ in batch}) == len(imgs)  # three sizes, three prompt lengths


def test_invalid_options_fail_at_engine_start(ckpt):
    with pytest.raises(Exception, match="retention_ratio must be a finite number in"):
        _llm(ckpt, {"method": "globalcom2", "retention_ratio": 1.5})
    gc.collect()


# ------------------------------------------------------------------------------------------ serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<image>\n{% endif %}{% endfor %}"
    " ASSISTANT:{% endif %}{% endfor %}"
)


def test_vllm_serve_openai_chat_with_a_base64_image(ckpt, compressed, tmp_path):
    img = _images()[0]
    (offline_prompt, _, offline_text) = _generate(compressed, [img])[0]
    template = tmp_path / "chat.jinja"
    template.write_text(CHAT_TEMPLATE)
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", ckpt, "--host", "127.0.0.1", "--port", str(port),
        "--hf-overrides", json.dumps(_overrides(COMPRESSED)),
        "--enforce-eager", "--dtype", "float32", "--max-model-len", "2048", "--seed", "0",
        "--chat-template", str(template), "--limit-mm-per-prompt", '{"image": 1}',
    ]  # fmt: skip
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline, url = time.monotonic() + 420, f"http://127.0.0.1:{port}"
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not come up in 420 s"
            time.sleep(2)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        b64 = base64.b64encode(buf.getvalue()).decode()
        body = {
            "model": ckpt,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
                        {"type": "text", "text": "what is this ?"},
                    ],
                }
            ],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        req = urllib.request.Request(
            url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.load(r)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    assert reply["usage"]["prompt_tokens"] == len(offline_prompt)
    assert reply["usage"]["completion_tokens"] == MAX_TOKENS
    assert reply["choices"][0]["message"]["content"] == offline_text
