"""The lmms-eval plugin: registration, model_args, batching, log-likelihoods, and end-to-end runs on local tasks.

Everything is offline: a tiny random LLaVA-NeXT saved to a temporary directory, and three task definitions
in tests/fixtures/lmms_tasks/ (MME, POPE and TextVQA formats, generated pictures) scored by lmms-eval's own
task functions. The model is random, so its accuracy is not checked; the metrics and files are.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import lmms_eval  # noqa: F401  (the eval extra is installed wherever these tests run; see docs/eval.md)
import pytest
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

import globalcom2.integrations.lmms_eval as plugin
from globalcom2 import get_config, is_patched
from globalcom2.integrations.lmms_eval.plugin import GlobalCom2LlavaNext
from globalcom2.testing.tiny import demo_image, tiny_model, tiny_processor
from globalcom2.tools import model_args as opts
from globalcom2.tools import report

ROOT = Path(__file__).resolve().parents[3]
TASKS_DIR = ROOT / "tests" / "fixtures" / "lmms_tasks"
FIXTURE_TASKS = ("gc2_mme", "gc2_pope", "gc2_textvqa_val")
#: what pyproject.toml declares (see docs/eval.md): [project.entry-points."lmms_eval.models"]
ENTRY_POINT_GROUP = "lmms_eval.models"
ENTRY_POINT = "globalcom2 = globalcom2.integrations.lmms_eval:manifest"
EXPECTED_METRICS = {
    "gc2_mme": ("mme_perception_score,none", "mme_cognition_score,none"),
    "gc2_pope": ("pope_accuracy,none", "pope_precision,none", "pope_recall,none", "pope_f1_score,none"),
    "gc2_textvqa_val": ("exact_match,none",),
}
N_DOCS = {"gc2_mme": 8, "gc2_pope": 6, "gc2_textvqa_val": 4}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A local LLaVA-NeXT checkpoint (tiny, random weights) as ``pretrained=PATH`` expects."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llava-next"
    tiny_model().save_pretrained(path)
    tiny_processor().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No network and a private datasets cache while lmms-eval runs."""
    cache = tmp_path_factory.mktemp("hf")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("LMMS_EVAL_DATASETS_CACHE", str(cache / "datasets"))
        yield cache


def _env(extra_path: Path | None = None, cache: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if cache is not None:
        env["LMMS_EVAL_DATASETS_CACHE"] = str(cache)
        env["HF_HOME"] = str(cache / "home")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _entry_point_dir(root: Path) -> Path:
    """A stand-in installed distribution whose only content is the entry point pyproject.toml declares."""
    dist = root / "globalcom2_entry_point_test-0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: globalcom2-entry-point-test\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{ENTRY_POINT}\n")
    return root


def _load(ckpt: Path, **args) -> GlobalCom2LlavaNext:
    """The plugin model as lmms-eval builds it from ``--model_args`` (and ``--device cpu``)."""
    arg_string = ",".join([f"pretrained={ckpt}"] + [f"{k}={v}" for k, v in args.items()])
    return GlobalCom2LlavaNext.create_from_arg_string(arg_string, {"device": "cpu"})


# ------------------------------------------------------------------------------------------ packaging


def test_importing_globalcom2_does_not_import_lmms_eval():
    code = (
        "import sys, globalcom2, globalcom2.integrations.lmms_eval, globalcom2.tools.model_args\n"
        "import globalcom2.tools.report\n"
        "assert 'lmms_eval' not in sys.modules, 'lmms_eval imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_env())


def test_manifest_registers_the_plugin_class():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.register_manifest(plugin.manifest())
    cls = registry.get_model_class("globalcom2")
    assert cls is GlobalCom2LlavaNext and issubclass(cls, lmms) and cls.is_simple


def test_lmms_eval_finds_the_plugin_through_the_entry_point(tmp_path):
    """lmms-eval's own loader, unmodified, resolves --model globalcom2 from the declared entry point."""
    code = "from lmms_eval.models import get_model; c = get_model('globalcom2'); print(c.__module__, c.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env=_env(_entry_point_dir(tmp_path / "ep")),
    ).stdout
    assert "globalcom2.integrations.lmms_eval.plugin GlobalCom2LlavaNext" in out


def test_pyproject_declares_the_entry_point_used_here():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project.get("entry-points", {}).get(ENTRY_POINT_GROUP)
    if declared is None:
        pytest.skip("pyproject.toml has no [project.entry-points.'lmms_eval.models'] yet (docs/eval.md)")
    name, value = (s.strip() for s in ENTRY_POINT.split("="))
    assert declared == {name: value}
    assert any("lmms-eval" in dep for dep in project["optional-dependencies"]["eval"])


def test_torchvision_absent_or_importable():
    """A torchvision built for another torch (e.g. PyPI's CUDA one next to a CPU torch) breaks transformers."""
    if find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # pragma: no cover - only on a broken install
        pytest.fail(f"torchvision does not import ({err}); `pip uninstall torchvision` (see docs/eval.md)")


# ------------------------------------------------------------------------------------------ model_args


def test_model_args_configure_any_method(ckpt):
    lm = _load(ckpt, method="fastv", retention_ratio=0.5, k=1, batch_size="3")
    cfg = get_config(lm.model)
    assert cfg.name == "fastv" and cfg.retention_ratio == 0.5 and cfg.k == 1
    assert lm.batch_size == 3 and lm.device == torch.device("cpu") and lm.model.dtype == torch.float32
    lm = _load(ckpt, method="globalcom2", retention_ratio=0.25, alpha=0.5, temperature=2, layout="authors")
    cfg = get_config(lm.model)
    assert (cfg.name, cfg.retention_ratio, cfg.alpha, cfg.temperature) == ("globalcom2", 0.25, 0.5, 2)


@pytest.mark.parametrize("args", [{"method": "none"}, {"method": "stock", "retention_ratio": 1}])
def test_method_none_is_the_unpatched_model(ckpt, args):
    lm = _load(ckpt, **args)
    assert not is_patched(lm.model) and lm.method_label == "none"


def test_unknown_option_names_the_valid_keys(ckpt):
    with pytest.raises(TypeError, match="valid options: retention_ratio, k") as err:
        _load(ckpt, method="fastv", alpha=0.5)
    assert "pretrained" in str(err.value) and "batch_size" in str(err.value)
    with pytest.raises(ValueError, match="retention_ratio"):
        _load(ckpt, method="globalcom2", retention_ratio=1.5)
    with pytest.raises(ValueError, match="retention_ratio must be 1"):
        _load(ckpt, method="none", retention_ratio=0.25)
    with pytest.raises(ValueError, match="method must be one of"):
        _load(ckpt, method="nosuchmethod")
    with pytest.raises(ValueError, match="dtype"):
        _load(ckpt, dtype="int8")


def test_option_values_are_typed():
    assert [opts.coerce(v) for v in ("3", "0.5", "True", "false", "authors", 2)] == [3, 0.5, True, False, "authors", 2]
    assert opts.batch_size_arg("4") == 4 and opts.batch_size_arg("auto") == 1 and opts.batch_size_arg(2) == 2
    with pytest.raises(ValueError):
        opts.batch_size_arg("0")


def test_not_a_llava_next_checkpoint_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(
        LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="llava_next"):
        _load(tmp_path)


# ------------------------------------------------------------------------------------------ prompts


def test_prompt_fallback_and_templates(ckpt, tmp_path):
    lm = _load(ckpt, method="none")
    assert lm.prompt("what is this ?", 1) == "USER: <image>\nwhat is this ? ASSISTANT:"
    assert lm.prompt("USER: <image> q", 1).count("<image>") == 1  # the task placed the image itself
    lm.conv_template = "vicuna_v1"
    assert lm.prompt("q", 2) == f"{opts.VICUNA_V1_SYSTEM} USER: <image>\n<image>\nq ASSISTANT:"
    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}Q:{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}"
        "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} A:{% endif %}"
    )
    lm = _load(ckpt, method="none", chat_template=template)
    assert lm.prompt("what ?", 1) == "Q:<image>what ? A:"


# ------------------------------------------------------------------------------------------ requests


def _requests(lm, kind: str, items: list[tuple], task: str = "t", split: str = "test") -> list[Instance]:
    """lmms-eval Instances over docs {"image": ...}; each item is (context, arg) with arg gen_kwargs or target."""
    docs = [{"image": img} for img, *_ in items]
    lm.task_dict = {task: {split: docs}}
    reqs = []
    for i, (_img, ctx, arg) in enumerate(items):
        args = (ctx, arg, lambda d: [d["image"]], i, task, split)
        reqs.append(
            Instance(request_type=kind, arguments=args, idx=0, metadata={"task": task, "doc_id": i, "repeats": 1})
        )
    return reqs


IMAGES = [
    demo_image(height=220, width=300, seed=1),
    demo_image(height=400, width=150, seed=2),
    demo_image(height=120, width=500, seed=3),
]
QUESTIONS = ["what is this ?", "what color is the sky in the picture ?", "how many cars ?"]


@pytest.mark.parametrize("method", ["globalcom2", "fastv", "none"])
def test_generate_until_batched_equals_one_at_a_time(ckpt, method):
    gen = {"max_new_tokens": 5, "temperature": 0, "do_sample": False}
    items = [(img, q, dict(gen)) for img, q in zip(IMAGES, QUESTIONS)] * 2
    extra = {"k": 1} if method == "fastv" else {}
    one = _load(ckpt, method=method, batch_size=1, **extra)
    many = _load(ckpt, method=method, batch_size=4, **extra)
    a = one.generate_until(_requests(one, "generate_until", items))
    b = many.generate_until(_requests(many, "generate_until", items))
    assert a == b and len(a) == len(items) and all(isinstance(t, str) for t in a)
    assert a[:3] == a[3:]  # the original order is restored after sorting by length
    assert items[0][2] == gen  # the task's generation kwargs are not mutated


def test_generate_until_honours_until_and_max_new_tokens(ckpt):
    lm = _load(ckpt, method="globalcom2", retention_ratio=0.25)
    item = (IMAGES[0], QUESTIONS[0])
    (full,) = lm.generate_until(_requests(lm, "generate_until", [(*item, {"max_new_tokens": 6})]))
    words = full.split()
    assert len(words) >= 3, full
    (short,) = lm.generate_until(_requests(lm, "generate_until", [(*item, {"max_new_tokens": 2})]))
    assert full.startswith(short) and len(short) < len(full)
    stop = words[2]
    (cut,) = lm.generate_until(_requests(lm, "generate_until", [(*item, {"max_new_tokens": 6, "until": [stop]})]))
    assert cut == full.split(stop, 1)[0].strip()


@pytest.mark.parametrize(
    ("gen", "sampled"),
    [
        ({}, {"do_sample": False, "max_new_tokens": 1024, "num_beams": 1}),
        ({"temperature": 0, "do_sample": False, "max_new_tokens": 7}, {"do_sample": False, "max_new_tokens": 7}),
        ({"temperature": 0.7, "top_p": 0.9, "num_beams": 2}, {"do_sample": True, "temperature": 0.7, "top_p": 0.9}),
        ({"temperature": 0.2, "do_sample": False}, {"do_sample": False}),  # MM-Vet's yaml: greedy
    ],
)
def test_generation_kwargs_reach_generate(ckpt, monkeypatch, gen, sampled):
    lm = _load(ckpt, method="none")
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        return kwargs["input_ids"]

    monkeypatch.setattr(lm.model, "generate", fake_generate)
    lm.generate_until(_requests(lm, "generate_until", [(IMAGES[0], QUESTIONS[0], gen)]))
    assert {k: seen[k] for k in sampled} == sampled
    if not seen["do_sample"]:
        assert seen["temperature"] is None and seen["top_p"] is None


@pytest.mark.parametrize("method", ["none", "globalcom2", "fastv"])
def test_loglikelihood_matches_a_direct_forward(ckpt, method):
    extra = {"k": 1} if method == "fastv" else {}
    lm = _load(ckpt, method=method, **extra)
    prompt = lm.prompt(QUESTIONS[0], 1)
    inputs = lm.processor(images=[IMAGES[0]], text=[prompt], return_tensors="pt")
    with torch.no_grad():
        logits = lm.model(**inputs).logits[0, -1]
    tok = lm.tokenizer
    best = int(logits.argmax())
    other = next(i for i in logits.argsort(descending=True).tolist() if tok.convert_ids_to_tokens(i) in ("cat", "dog"))
    want = torch.log_softmax(logits.float(), -1)
    items = [(IMAGES[0], QUESTIONS[0], " " + tok.decode([best])), (IMAGES[0], QUESTIONS[0], " " + tok.decode([other]))]
    (lp_best, greedy_best), (lp_other, greedy_other) = lm.loglikelihood(_requests(lm, "loglikelihood", items))
    assert greedy_best and not greedy_other
    assert math.isclose(lp_best, float(want[best]), rel_tol=1e-4, abs_tol=1e-4)
    assert math.isclose(lp_other, float(want[other]), rel_tol=1e-4, abs_tol=1e-4)


@pytest.mark.parametrize("method", ["none", "globalcom2", "fastv"])
def test_greedy_answer_is_greedy_under_loglikelihood(ckpt, method):
    """Scoring the model's own 3-token greedy answer: is_greedy holds at every step, whatever the method."""
    extra = {"k": 1} if method == "fastv" else {}
    lm = _load(ckpt, method=method, **extra)
    (answer,) = lm.generate_until(_requests(lm, "generate_until", [(IMAGES[1], QUESTIONS[1], {"max_new_tokens": 3})]))
    assert len(answer.split()) == 3, answer
    reqs = _requests(lm, "loglikelihood", [(IMAGES[1], QUESTIONS[1], " " + answer), (IMAGES[1], QUESTIONS[1], " cat")])
    (lp, greedy), (lp_cat, _) = lm.loglikelihood(reqs)
    assert greedy and lp < 0 and math.isfinite(lp) and lp_cat < 0


def test_video_and_multi_round_are_refused(ckpt):
    lm = _load(ckpt, method="none")
    reqs = _requests(lm, "generate_until", [(Image.new("RGB", (8, 8)), "q", {"max_new_tokens": 1})])
    lm.task_dict["t"]["test"][0]["image"] = "clip.mp4"
    with pytest.raises(NotImplementedError, match="images only"):
        lm.generate_until(reqs)
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round([])


# ------------------------------------------------------------------------------------------ end to end


def test_fixture_data_is_what_make_data_writes():
    """data/*.parquet match the generator (columns, values, picture sizes) and load as lmms-eval loads them."""
    import importlib.util

    import datasets

    spec = importlib.util.spec_from_file_location("make_data", TASKS_DIR / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    for name, rows in (
        ("mme", make_data.mme_rows()),
        ("pope", make_data.pope_rows()),
        ("textvqa", make_data.textvqa_rows()),
    ):
        stored = datasets.Dataset.from_parquet(str(TASKS_DIR / "data" / f"{name}.parquet"))
        assert isinstance(stored.features["image"], datasets.Image)
        assert len(stored) == len(rows)
        for want, got in zip(rows, stored):
            assert {k: v for k, v in got.items() if k != "image"} == {k: v for k, v in want.items() if k != "image"}
            assert got["image"].size == want["image"].size


def _check_results(results: dict) -> None:
    for task, keys in EXPECTED_METRICS.items():
        got = results["results"][task]
        for key in keys:
            assert isinstance(got[key], (int, float)), (task, key, got.get(key))
        assert results["n-samples"][task]["effective"] == N_DOCS[task]
    mme = results["results"]["gc2_mme"]
    assert 0 <= mme["mme_perception_score,none"] <= 600  # 3 perception categories, 200 points each
    assert 0 <= results["results"]["gc2_pope"]["pope_f1_score,none"] <= 1
    assert 0 <= results["results"]["gc2_textvqa_val"]["exact_match,none"] <= 1


@pytest.fixture(scope="module")
def cli_run(ckpt, tmp_path_factory) -> Path:
    """``python -m lmms_eval --model globalcom2 ...`` as a user runs it: plugin from the entry point, local tasks."""
    root = tmp_path_factory.mktemp("cli")
    out = root / "out"
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "globalcom2",
        "--model_args",
        f"pretrained={ckpt},method=globalcom2,retention_ratio=0.25",
        "--tasks",
        ",".join(FIXTURE_TASKS),
        "--include_path",
        str(TASKS_DIR),
        "--batch_size",
        "2",
        "--device",
        "cpu",
        "--output_path",
        str(out),
    ]
    env = _env(_entry_point_dir(root / "ep"), cache=root / "cache")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    return _results_file(proc, out)


def _results_file(proc: subprocess.CompletedProcess, out: Path) -> Path:
    """The one results file an lmms-eval CLI run wrote under ``out``, or a failure showing the run's output.

    lmms-eval logs an evaluation error (e.g. an ImportError inside a dependency) and still exits 0, so a
    missing file is the only sign: the failure then shows the tail of its stderr, where the cause is.
    """
    tail = f"\n--- stdout (tail) ---\n{proc.stdout[-2000:]}\n--- stderr (tail) ---\n{proc.stderr[-4000:]}"
    if proc.returncode != 0:
        pytest.fail(f"lmms-eval exited with {proc.returncode}{tail}")
    found = sorted(out.rglob("*_results.json"))
    if len(found) != 1:
        pytest.fail(f"lmms-eval exited 0 but wrote {len(found)} *_results.json files under {out} (want 1){tail}")
    return found[0]


def test_a_run_without_results_shows_lmms_evals_stderr(tmp_path):
    """What lmms-eval did with filelock 4.3: exit 0, no results file, the cause only in its log."""
    cause = "ModuleNotFoundError: No module named 'filelock._api'"
    proc = subprocess.CompletedProcess(["lmms_eval"], 0, stdout="", stderr="x" * 9000 + f"ERROR | {cause}\n")
    with pytest.raises(pytest.fail.Exception, match="wrote 0 \\*_results.json files") as err:
        _results_file(proc, tmp_path)
    assert cause in str(err.value)
    failed = subprocess.CompletedProcess(["lmms_eval"], 2, stdout="", stderr="usage: lmms_eval ...\n")
    with pytest.raises(pytest.fail.Exception, match="exited with 2(.|\n)*usage: lmms_eval"):
        _results_file(failed, tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x_results.json").write_text("{}")
    assert _results_file(proc, tmp_path) == tmp_path / "run" / "x_results.json"


def test_lmms_eval_cli_writes_results_with_the_expected_metrics(cli_run):
    results = json.loads(cli_run.read_text())
    _check_results(results)
    assert results["config"]["model"] == "globalcom2"
    assert "method=globalcom2,retention_ratio=0.25" in results["config"]["model_args"]
    assert results["config"]["model_backend"].startswith("globalcom2.integrations.lmms_eval.plugin.GlobalCom2LlavaNext")


def test_simple_evaluate_stock_run_and_report(ckpt, offline, cli_run, tmp_path, monkeypatch, capsys):
    """The stock row through lmms-eval's Python API, then ``globalcom2 report`` over both runs' files."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from lmms_eval.utils import handle_non_serializable

    monkeypatch.chdir(tmp_path)  # TextVQA writes its submission file under the working directory
    plugin.register()
    results = simple_evaluate(
        model="globalcom2",
        model_args=f"pretrained={ckpt},method=none",
        tasks=list(FIXTURE_TASKS),
        batch_size="3",
        device="cpu",
        task_manager=TaskManager("WARNING", include_path=str(TASKS_DIR), model_name="globalcom2"),
        log_samples=True,
    )
    _check_results(results)
    answers = [s["filtered_resps"][0] for s in results["samples"]["gc2_pope"]]
    assert len(answers) == 6 and all(isinstance(a, str) for a in answers)
    stock = tmp_path / "stock" / "20250101_000000_results.json"
    stock.parent.mkdir()
    stock.write_text(json.dumps({k: v for k, v in results.items() if k != "samples"}, default=handle_non_serializable))

    maps = ["--task", "gc2_mme=MME", "--task", "gc2_pope=POPE", "--task", "gc2_textvqa_val=TextVQA"]
    csv_path = tmp_path / "table.csv"
    assert report.main([str(stock), str(cli_run), *maps, "--csv", str(csv_path)]) == 0
    md = capsys.readouterr().out
    assert md.splitlines()[0] == "| Method | R | TextVQA | POPE | MME | Avg. |"
    assert md.splitlines()[2].startswith("| Stock | 100% |")
    assert md.splitlines()[3].startswith("| GlobalCom² | 25% |")

    # the same real files with known scores put in: relative scores come out right
    for path, mme, f1 in ((stock, 1519.0, 0.865), (cli_run, 1493.5, 0.85)):
        data = json.loads(path.read_text())
        data["results"]["gc2_mme"]["mme_perception_score,none"] = mme
        data["results"]["gc2_pope"]["pope_f1_score,none"] = f1
        data["results"]["gc2_textvqa_val"]["exact_match,none"] = 0.5
        path.write_text(json.dumps(data))
    assert report.main([str(stock), str(cli_run), *maps, "--csv", str(csv_path)]) == 0
    row = md_row(capsys.readouterr().out, "GlobalCom²")
    want = (100 + 100 * 0.85 / 0.865 + 100 * 1493.5 / 1519.0) / 3
    assert row == ["GlobalCom²", "25%", "50.0", "85.0", "1493.5", f"{want:.1f}%"]


def md_row(markdown: str, label: str) -> list[str]:
    """The cells of the Markdown row whose first cell is ``label``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no row {label!r} in\n{markdown}")
