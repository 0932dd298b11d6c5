"""The vLLM plugin for Qwen2.5-VL and Qwen3-VL end to end on tiny fp32 checkpoints.

Per family, as for the other families: R = 1 with neutral options gives stock vLLM's tokens (every kept
token back at its stock M-RoPE position through the offset columns); each prompt holds
``globalcom2.num_image_tokens`` placeholders; greedy tokens equal the HF path's (``globalcom2.apply``) for
the default scorer, for VisionZip (merged contextual tokens, DeepStack rows on Qwen3-VL) and DivPrune (the
tower's own vectors); a batch of
mixed sizes gives each request what it gets alone; two images in one prompt (positions shift past the
first); invalid options and pipeline parallelism stop the engine at start.
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
from globalcom2.integrations.vllm import register, save_vllm_checkpoint  # noqa: E402
from globalcom2.testing import tiny_qwen  # noqa: E402
from globalcom2.testing.tiny import demo_image  # noqa: E402

pytestmark = pytest.mark.vllm

MAX_TOKENS = 8
SIZES = [(220, 300), (400, 150), (120, 500)]  # (height, width): three grids
COMPRESSED = {"method": "globalcom2", "retention_ratio": 0.25}
VISIONZIP = {"method": "visionzip", "retention_ratio": 0.25}
DIVPRUNE = {"method": "divprune", "retention_ratio": 0.25}  # the Qwen port's tower space (the family's auto)
NEUTRAL = {"method": "globalcom2", "retention_ratio": 1.0, "allocation": "uniform"}
FAMILIES = {
    "qwen2_5_vl": dict(model=tiny_qwen.tiny_qwen2_5_vl_model, tiny={"text_heads": 2},
                       processor=tiny_qwen.tiny_qwen2_5_vl_processor,
                       arch="GlobalCom2Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": dict(model=tiny_qwen.tiny_qwen3_vl_model, tiny={"head_dim": 32},
                     processor=tiny_qwen.tiny_qwen3_vl_processor, arch="GlobalCom2Qwen3VLForConditionalGeneration"),
}  # fmt: skip
PROMPT = tiny_qwen.qwen_prompt()
PROMPT2 = tiny_qwen.qwen_prompt("compare them .", n_images=2)


def _images():
    return [demo_image(height=h, width=w, seed=i + 1) for i, (h, w) in enumerate(SIZES)]


def _llm(path: str, arch: str | None, options: dict | None, **kwargs):
    from vllm import LLM

    register()
    overrides = None if options is None else {"architectures": [arch], "globalcom2": options}
    return LLM(path, hf_overrides=overrides, enforce_eager=True, dtype="float32", max_model_len=2048, seed=0,
               limit_mm_per_prompt={"image": 2}, **kwargs)  # fmt: skip


def _generate(llm, reqs) -> list[tuple[list[int], list[int]]]:
    from vllm import SamplingParams

    outs = llm.generate(
        reqs, SamplingParams(max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    )
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outs]


def _requests():
    imgs = _images()
    return [{"prompt": PROMPT, "multi_modal_data": {"image": img}} for img in imgs] + [
        {"prompt": PROMPT2, "multi_modal_data": {"image": imgs[:2]}}
    ]


def _once(path, fam, options, alone=False):
    llm = _llm(path, fam["arch"], options)
    try:
        batch = _generate(llm, _requests())
        return batch, ([_generate(llm, [r])[0] for r in _requests()] if alone else None)
    finally:
        del llm
        gc.collect()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, spec, checkpoint path, results of the stock / neutral / compressed / visionzip engines)."""
    name, fam = request.param, FAMILIES[request.param]
    model = fam["model"](seed=0, **fam["tiny"])
    path = save_vllm_checkpoint(model, fam["processor"](), tmp_path_factory.mktemp(name) / "m")
    stock, _ = _once(path, fam, None)
    neutral, _ = _once(path, fam, NEUTRAL)
    compressed, alone = _once(path, fam, COMPRESSED, alone=True)
    visionzip, _ = _once(path, fam, VISIONZIP)
    divprune, _ = _once(path, fam, DIVPRUNE)
    results = {"stock": stock, "neutral": neutral, "compressed": compressed, "alone": alone, "visionzip": visionzip,
               "divprune": divprune}  # fmt: skip
    return name, fam, path, results


def _hf_tokens(fam, options: dict) -> list[list[int]]:
    model, processor = fam["model"](seed=0, **fam["tiny"]), fam["processor"]()
    globalcom2.apply(model, options["method"], budget="exact", **{k: v for k, v in options.items() if k != "method"})
    out = []
    for r in _requests():
        imgs = r["multi_modal_data"]["image"]
        imgs = imgs if isinstance(imgs, list) else [imgs]
        inputs = processor(images=imgs, text=[r["prompt"]], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inputs, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        out.append(gen[0, inputs["input_ids"].shape[1] :].tolist())
    return out


def test_ratio_one_neutral_options_give_stock_vllm_tokens(family):
    _, _, _, r = family
    assert r["neutral"] == r["stock"]


def test_prompt_tokens_are_the_library_count(family):
    _, fam, _, r = family
    model_cfg, processor = fam["model"](seed=0, **fam["tiny"]).config, fam["processor"]()
    opts = {k: v for k, v in COMPRESSED.items() if k != "method"}
    for (prompt, _), (stock_prompt, _), size in zip(r["compressed"], r["stock"], SIZES):
        k = globalcom2.num_image_tokens(model_cfg, size, budget="exact", processor=processor, **opts)
        n = globalcom2.num_image_tokens(model_cfg, size, budget="exact", retention_ratio=1.0, processor=processor)
        assert k < n
        assert prompt.count(model_cfg.image_token_id) == k
        assert len(prompt) == len(stock_prompt) - n + k


@pytest.mark.parametrize("which", ["compressed", "visionzip", "divprune"])
def test_greedy_tokens_equal_the_hf_path(family, which):
    _, fam, _, r = family
    hf = _hf_tokens(fam, {"compressed": COMPRESSED, "visionzip": VISIONZIP, "divprune": DIVPRUNE}[which])
    assert [t for _, t in r[which]] == hf
    assert len({t for ts in hf for t in ts}) > 2
    assert [t for _, t in r[which]] != [t for _, t in r["stock"]]


def test_mixed_batch_gives_each_request_its_own_result(family):
    _, _, _, r = family
    assert r["compressed"] == r["alone"]
    assert len({len(p) for p, _ in r["compressed"]}) >= 3  # mixed prompt lengths in one batch


def test_invalid_options_and_pipeline_parallelism_fail_at_engine_start(family):
    _, fam, path, _ = family
    with pytest.raises(Exception, match="retention_ratio must be a finite number in"):
        _llm(path, fam["arch"], {"method": "globalcom2", "retention_ratio": 1.5})
    with pytest.raises(Exception, match="scorer must be one of|scorer='cls'"):
        _llm(path, fam["arch"], {"method": "globalcom2", "scorer": "cls"})
    with pytest.raises(Exception, match="prompt's text"):
        _llm(path, fam["arch"], {"method": "cdpruner"})
    gc.collect()


def test_pipeline_parallelism_and_vllm_pruning_are_refused_with_the_reason():
    """Checked where the engine builds the model (no engine needed to see the message)."""
    from types import SimpleNamespace

    from globalcom2.integrations.vllm.qwen import GlobalCom2Qwen2_5_VLForConditionalGeneration as Model

    cfg = tiny_qwen.tiny_qwen2_5_vl_config()
    cfg.globalcom2 = COMPRESSED

    def vllm_config(pp=1, pruning=False, compile_mm=False):
        mm = SimpleNamespace(is_multimodal_pruning_enabled=lambda: pruning)
        return SimpleNamespace(
            model_config=SimpleNamespace(hf_config=cfg, get_multimodal_config=lambda: mm),
            parallel_config=SimpleNamespace(pipeline_parallel_size=pp),
            compilation_config=SimpleNamespace(compile_mm_encoder=compile_mm),
        )

    bare = object.__new__(Model)
    bare._globalcom2_init(vllm_config())  # the defaults start
    with pytest.raises(ValueError, match="pipeline_parallel_size=2: .* pipeline_parallel_size=1"):
        bare._globalcom2_init(vllm_config(pp=2))
    with pytest.raises(ValueError, match="video_pruning_rate"):
        bare._globalcom2_init(vllm_config(pruning=True))
    with pytest.raises(ValueError, match="compile_mm_encoder"):
        bare._globalcom2_init(vllm_config(compile_mm=True))


def test_vllm_serve_with_base64_images_gives_the_offline_tokens(family, tmp_path):
    """``vllm serve`` with the plugin: a ChatML chat request per image (base64 PNG) prefills the offline engine's
    prompt token for token and decodes its greedy tokens."""
    from globalcom2.integrations.vllm.serve_bench import QWEN_CHAT_TEMPLATE
    from globalcom2.integrations.vllm.server import served_tokens

    name, fam, path, got = family
    served = served_tokens(path, fam["arch"], COMPRESSED, QWEN_CHAT_TEMPLATE, _images(), "what is this ?",
                           MAX_TOKENS, str(tmp_path), name)  # fmt: skip
    assert served == got["compressed"][: len(SIZES)], name
