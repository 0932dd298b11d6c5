"""``globalcom2 serve-bench`` without vLLM: argument errors, the summary and its table (the run is in
``test_vllm_serve_bench.py``, marker ``vllm``)."""

from __future__ import annotations

import json
import math

import pytest

from globalcom2 import cli
from globalcom2.integrations.vllm import serve_bench as sb
from globalcom2.tools.flops import LMShape, prefill_flops


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--ratios", "1.5"], "--ratios 1.5: retention_ratio must be in (0, 1]"),
        (["--ratios", "1", "0"], "--ratios 0: retention_ratio must be in (0, 1]"),
        (["--ratios", "nan"], "--ratios nan: retention_ratio must be in (0, 1]"),
        (["--ratios", "x"], "--ratios x: retention_ratio must be a number in (0, 1]"),
        (["--concurrency", "4", "0"], "--concurrency 0: must be a whole number >= 1"),
        (["--repeats", "two"], "--repeats two: must be a whole number >= 1"),
        (["--requests", "0"], "--requests 0: must be a whole number >= 1"),
        (["--max-tokens", "-3"], "--max-tokens -3: must be a whole number >= 1"),
        (["--family", "qwen9"], "--family qwen9: must be one of llava_next"),
        (["--method", "fastv"], "--method fastv: method 'fastv' prunes inside the language model"),
        (["--method", "cdpruner"], "--method cdpruner: method 'cdpruner' ranks visual tokens against the prompt"),
        (["--kv-cache-gib", "0"], "--kv-cache-gib 0: must be a number of GiB > 0"),
        (["--out", "/no/such/dir/x.json"], "--out /no/such/dir/x.json: its directory does not exist"),
        (["--launch", "sideways"], "argument --launch: invalid choice: 'sideways'"),
    ],
)
def test_bad_arguments_exit_with_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        sb.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("globalcom2 serve-bench: error: ") and message in err


def test_cli_table_has_the_verb():
    assert cli.TOOLS["serve-bench"][0] == "globalcom2.integrations.vllm.serve_bench"


def test_every_family_entry_has_what_the_run_needs():
    for name, fam in sb.FAMILIES.items():
        assert callable(fam.build) and callable(fam.stock_tokens), name
        assert fam.image_token in fam.chat_template and fam.architecture, name
        assert fam.sizes and fam.smoke_sizes, name


def _cell(rps, ttft, visual, prompt_extra=8):
    return {
        "requests": len(visual), "ok": len(visual), "errors": [], "wall_s": len(visual) / rps,
        "requests_per_s": rps, "ttft_p50_s": ttft, "ttft_p95_s": 1.5 * ttft, "latency_p50_s": 2 * ttft,
        "output_tokens_per_s": 16 * rps, "prompt_tokens": [v + prompt_extra for v in visual], "visual_tokens": visual,
        "background_cpu_s": 0.1,
    }  # fmt: skip


def test_summary_pairs_rounds_and_gives_the_eq8_bound():
    lm = LMShape(2, 4096, 11008, 32, 32)
    configs = [("stock", None), ("globalcom2 R=0.25", {"method": "globalcom2", "retention_ratio": 0.25})]
    cells = {
        ("stock", 4): [_cell(1.0, 2.0, [2000, 1000]), _cell(0.5, 4.0, [2000, 1000])],  # round 2: a slower machine
        ("globalcom2 R=0.25", 4): [_cell(3.0, 0.5, [500, 250]), _cell(1.5, 1.0, [500, 250])],
    }
    rows = sb.summarise(configs, [4], cells, lm)
    stock, comp = rows
    assert stock["eq8_prefill_flops_bound"] == 1.0 and stock["speedup_requests_per_s"]["median"] == 1.0
    bound = (prefill_flops(lm, 2000) + prefill_flops(lm, 1000)) / (prefill_flops(lm, 500) + prefill_flops(lm, 250))
    assert math.isclose(comp["eq8_prefill_flops_bound"], bound)
    # the drift (x0.5 in round 2) cancels in the per-round ratios
    assert comp["speedup_requests_per_s"] == {"median": 3.0, "min": 3.0, "max": 3.0, "values": [3.0, 3.0]}
    assert comp["speedup_ttft_p50"]["median"] == 4.0
    assert math.isclose(comp["requests_per_s_speedup_vs_bound"], 3.0 / bound)
    assert comp["requests_per_s"] == {"median": 2.25, "min": 1.5, "max": 3.0, "values": [3.0, 1.5]}
    assert (comp["visual_tokens_mean"], comp["prompt_tokens_mean"]) == (375.0, 383.0)
    table = sb.format_table({"rows": rows})
    assert table.splitlines()[0].startswith("| config | c | prompt tok | visual tok | req/s | TTFT p50 s")
    assert "| globalcom2 R=0.25 | 4 | 383 | 375 | 2.250 [1.500-3.000] | 0.750 [0.500-1.000] |" in table
    assert f"| 3.00 | 4.00 | {bound:.2f} | {3.0 / bound:.2f} | {4.0 / bound:.2f} |" in table


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    lm = LMShape(2, 4096, 11008, 32, 32)
    configs = [("stock", None), ("globalcom2 R=0.25", {"retention_ratio": 0.25})]
    cells = {(n, c): [_cell(1.0 + c, 1.0, [800, 400])] for n, _ in configs for c in (1, 4)}
    doc = {"rows": sb.summarise(configs, [1, 4], cells, lm), "concurrency": [1, 4], "model": "m", "vllm": "x",
           "machine": "y", "repeats": 1}  # fmt: skip
    sb.plot(doc, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 10_000
    saved = tmp_path / "doc.json"
    saved.write_text(json.dumps(doc))
    assert sb.main(["--from-json", str(saved), "--plot", str(tmp_path / "again.png")]) == 0  # no vLLM needed
    assert (tmp_path / "again.png").stat().st_size > 10_000


def test_from_json_refuses_what_is_not_a_document(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert sb.main(["--from-json", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"globalcom2 serve-bench: error: --from-json {bad}: not a serve-bench")
