"""The vLLM plugin for LLaVA-OneVision and InternVL end to end on tiny fp32 checkpoints.

Per family, as ``test_vllm.py`` for LLaVA-NeXT: R = 1 with neutral options gives stock vLLM's tokens; each
prompt holds ``globalcom2.num_image_tokens`` placeholders; greedy tokens equal the HF path's
(``globalcom2.apply``, budget="exact"); a batch of mixed sizes gives each request what it gets alone;
invalid options stop the engine at start. vLLM samples with ``min_tokens`` (EOS masked, as HF's
``min_new_tokens`` masks it). Three in-process engines per family (10-40 s each on 2 cores).
"""

from __future__ import annotations

import gc
import os

import pytest
import torch

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
if os.environ.get("GLOBALCOM2_REQUIRE_VLLM"):
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

import globalcom2  # noqa: E402
from globalcom2.budget import stock_image_tokens  # noqa: E402
from globalcom2.integrations.vllm import register, save_vllm_checkpoint  # noqa: E402
from globalcom2.testing import tiny_internvl, tiny_onevision  # noqa: E402
from globalcom2.testing.tiny import demo_image  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8
SIZES = [(220, 300), (400, 150), (120, 500)]  # (height, width): three grids
COMPRESSED = {"method": "globalcom2", "retention_ratio": 0.25}
FAMILIES = {
    "onevision": dict(
        model=tiny_onevision.tiny_onevision_model, processor=tiny_onevision.tiny_onevision_processor,
        arch="GlobalCom2LlavaOnevisionForConditionalGeneration", prompt="<image>\nwhat is this ?",
        template="{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
                 "{% else %}<image>\n{% endif %}{% endfor %}{% endfor %}",
        neutral={"method": "globalcom2", "retention_ratio": 1.0, "allocation": "uniform", "thumbnail_order": "spatial"},
        stock_tokens=stock_image_tokens,
        image_token=lambda cfg: cfg.image_token_index, hf_kwargs=lambda sizes: {},
    ),
    "internvl": dict(
        model=tiny_internvl.tiny_internvl_model, processor=tiny_internvl.tiny_internvl_processor,
        arch="GlobalCom2InternVLForConditionalGeneration", prompt="user : <IMG_CONTEXT> what is this ? assistant :",
        template="{% for m in messages %}user : {% for c in m['content'] %}{% if c['type'] == 'text' %}"
                 "{{ c['text'] }}{% else %}<IMG_CONTEXT> {% endif %}{% endfor %} assistant :{% endfor %}",
        neutral={"method": "globalcom2", "retention_ratio": 1.0, "allocation": "uniform"},
        stock_tokens=stock_image_tokens,
        image_token=lambda cfg: cfg.image_token_id, hf_kwargs=lambda sizes: {"image_sizes": sizes},
    ),
}  # fmt: skip
TINY = {"text_heads": 2}  # head_dim 32: the smallest vLLM's CPU attention supports


def _images():
    return [demo_image(height=h, width=w, seed=i + 1) for i, (h, w) in enumerate(SIZES)]


def _llm(path: str, arch: str | None, options: dict | None):
    from vllm import LLM

    register()
    overrides = None if options is None else {"architectures": [arch], "globalcom2": options}
    return LLM(path, hf_overrides=overrides, enforce_eager=True, dtype="float32", max_model_len=2048, seed=0,
               limit_mm_per_prompt={"image": 1})  # fmt: skip


def _generate(llm, prompt, imgs) -> list[tuple[list[int], list[int]]]:
    from vllm import SamplingParams

    reqs = [{"prompt": prompt, "multi_modal_data": {"image": img}} for img in imgs]
    outs = llm.generate(
        reqs, SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    )
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]


def _once(path, fam, options, alone=False):
    llm = _llm(path, fam["arch"], options)
    try:
        batch = _generate(llm, fam["prompt"], _images())
        return batch, ([_generate(llm, fam["prompt"], [img])[0] for img in _images()] if alone else None)
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, spec, checkpoint path, results of the stock / neutral / compressed engines)."""
    name, fam = request.param, FAMILIES[request.param]
    path = save_vllm_checkpoint(fam["model"](seed=0, **TINY), fam["processor"](), tmp_path_factory.mktemp(name) / "m")
    stock, _ = _once(path, fam, None)
    neutral, _ = _once(path, fam, fam["neutral"])
    compressed, alone = _once(path, fam, COMPRESSED, alone=True)
    return name, fam, path, {"stock": stock, "neutral": neutral, "compressed": compressed, "alone": alone}


def _hf_tokens(fam, options: dict) -> list[list[int]]:
    model, processor = fam["model"](seed=0, **TINY), fam["processor"]()
    globalcom2.apply(model, options["method"], budget="exact", **{k: v for k, v in options.items() if k != "method"})
    out = []
    for img, (h, w) in zip(_images(), SIZES):
        inputs = processor(images=[img], text=[fam["prompt"]], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, **fam["hf_kwargs"]([(h, w)]), max_new_tokens=MAX_TOKENS,
                                 min_new_tokens=MAX_TOKENS, do_sample=False)  # fmt: skip
        out.append(gen[0, inputs["input_ids"].shape[1] :].tolist())
    return out


def test_ratio_one_neutral_options_give_stock_vllm_tokens(family):
    _, _, _, r = family
    assert r["neutral"] == r["stock"]


def test_prompt_tokens_are_the_library_count(family):
    name, fam, _, r = family
    cfg = fam["model"](seed=0, **TINY).config
    for (prompt, _), (stock_prompt, _), size in zip(r["compressed"], r["stock"], SIZES):
        k = globalcom2.num_image_tokens(
            cfg, size, budget="exact", **{k: v for k, v in COMPRESSED.items() if k != "method"}
        )
        n = fam["stock_tokens"](cfg, size)
        assert k < n
        assert prompt.count(fam["image_token"](cfg)) == k
        assert len(prompt) == len(stock_prompt) - n + k


def test_greedy_tokens_equal_the_hf_path(family):
    _, fam, _, r = family
    hf = _hf_tokens(fam, COMPRESSED)
    assert [t for _, t in r["compressed"]] == hf
    assert len({t for ts in hf for t in ts}) > 2
    assert [t for _, t in r["compressed"]] != [t for _, t in r["stock"]]


def test_mixed_batch_gives_each_request_its_own_result(family):
    _, _, _, r = family
    assert r["compressed"] == r["alone"]
    assert len({len(p) for p, _ in r["compressed"]}) == len(SIZES)


def test_invalid_options_fail_at_engine_start(family):
    name, fam, path, _ = family
    with pytest.raises(Exception, match="retention_ratio must be a finite number in"):
        _llm(path, fam["arch"], {"method": "globalcom2", "retention_ratio": 1.5})
    bad = {"method": "visionzip"} if name == "onevision" else {"method": "globalcom2", "scorer": "nope"}
    with pytest.raises(Exception, match="visionzip|scorer must be one of"):
        _llm(path, fam["arch"], bad)
    gc.collect()


def test_vllm_serve_with_base64_images_gives_the_offline_tokens(family, tmp_path):
    """``vllm serve`` with the plugin: a chat request per image (base64 PNG data URL, rendered by a template to
    the offline prompt) prefills the offline engine's prompt token for token and decodes its greedy tokens."""
    from globalcom2.integrations.vllm.server import served_tokens

    name, fam, path, got = family
    served = served_tokens(path, fam["arch"], COMPRESSED, fam["template"], _images(), "what is this ?", MAX_TOKENS,
                           str(tmp_path), name)  # fmt: skip
    assert served == got["compressed"], name
