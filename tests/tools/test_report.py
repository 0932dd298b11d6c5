"""``globalcom2 report``: lmms-eval result files with known numbers -> the paper's table and relative scores."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from globalcom2.tools import cli, report

# lmms-eval's scales: VQA accuracy and POPE F1 as fractions, MME perception as a sum, MMBench/MM-Vet in %.
STOCK = {
    "gqa": {"exact_match,none": 0.642, "exact_match_stderr,none": 0.004},
    "textvqa_val": {"exact_match,none": 0.6493, "submission,none": None},
    "pope": {"pope_accuracy,none": 0.88, "pope_f1_score,none": 0.865},
    "mme": {"mme_perception_score,none": 1519.0, "mme_cognition_score,none": 332.0},
    "mmbench_en_dev": {"gpt_eval_score,none": 67.4, "submission,none": None},
    "mmvet": {"gpt_eval_score,none": 43.9},
}
G25 = {
    "gqa": {"exact_match,none": 0.616},
    "textvqa_val": {"exact_match,none": 0.6196},
    "pope": {"pope_accuracy,none": 0.87, "pope_f1_score,none": 0.847},
    "mme": {"mme_perception_score,none": 1493.5, "mme_cognition_score,none": 300.0},
    "mmbench_en_dev": {"gpt_eval_score,none": 66.2},
    "mmvet": {"gpt_eval_score,none": 40.1},
}


def write_results(path: Path, results: dict, model: str = "globalcom2", model_args: str = "") -> Path:
    """A results file shaped like lmms-eval's ``*_results.json``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "results": results,
        "config": {"model": model, "model_args": model_args, "batch_size": "1"},
        "lmms_eval_version": "0.7.3",
    }
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def runs(tmp_path) -> dict[str, Path]:
    ck = "pretrained=/ckpt/llava-v1.6-vicuna-7b-hf"
    return {
        "stock": write_results(tmp_path / "stock" / "r_results.json", STOCK, model_args=f"{ck},method=none"),
        "g25": write_results(
            tmp_path / "g25" / "r_results.json", G25, model_args=f"{ck},method=globalcom2,retention_ratio=0.25"
        ),
    }


def cells(markdown: str, label: str) -> list[str]:
    for line in markdown.splitlines():
        row = [c.strip() for c in line.strip().strip("|").split("|")]
        if row[0] == label:
            return row
    raise AssertionError(f"no row {label!r}:\n{markdown}")


def test_relative_scores_and_average(runs):
    table = report.build_table([report.load_run(runs["stock"]), report.load_run(runs["g25"])])
    assert [b.column for b in table.columns] == ["GQA", "TextVQA", "POPE", "MME", "MMB", "MM-Vet"]
    stock, g = table.rows
    assert stock.method == "none" and stock.retention_ratio == 1.0 and stock.average == pytest.approx(100.0)
    assert stock.scores["MME"] == 1519.0 and stock.scores["GQA"] == pytest.approx(64.2)
    assert stock.scores["POPE"] == pytest.approx(86.5)
    assert g.label == "GlobalCom²" and g.retention_ratio == 0.25
    assert g.relative["MME"] == pytest.approx(100 * 1493.5 / 1519.0)  # 98.32...%
    assert g.relative["MME"] == pytest.approx(98.3213, abs=1e-4)
    expected = [61.6 / 64.2, 61.96 / 64.93, 84.7 / 86.5, 1493.5 / 1519.0, 66.2 / 67.4, 40.1 / 43.9]
    assert g.average == pytest.approx(100 * sum(expected) / len(expected))


def test_markdown_layout(runs, capsys):
    assert report.main([str(runs["g25"]), str(runs["stock"])]) == 0  # stock row first whatever the order
    md = capsys.readouterr().out
    lines = md.splitlines()
    assert lines[0] == "| Method | R | GQA | TextVQA | POPE | MME | MMB | MM-Vet | Avg. |"
    assert cells(md, "Stock") == ["Stock", "100%", "64.2", "64.9", "86.5", "1519.0", "67.4", "43.9", "100.0%"]
    row = cells(md, "GlobalCom²")
    assert row[:8] == ["GlobalCom²", "25%", "61.6", "62.0", "84.7", "1493.5", "66.2", "40.1"]
    assert row[8] == "96.2%"  # mean of 61.6/64.2, 61.96/64.93, 84.7/86.5, 1493.5/1519, 66.2/67.4, 40.1/43.9
    assert lines.index("| " + " | ".join(cells(md, "Stock")) + " |") == 2


def test_relative_cells_and_files(runs, tmp_path, capsys):
    out_csv, out_md = tmp_path / "t.csv", tmp_path / "t.md"
    args = [str(runs["stock"]), str(runs["g25"]), "--relative", "--csv", str(out_csv), "--markdown", str(out_md)]
    assert report.main(args) == 0
    md = capsys.readouterr().out
    assert out_md.read_text() == md
    assert cells(md, "GlobalCom²")[5] == "1493.5 (98.3%)"
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["label"] for r in rows] == ["Stock", "GlobalCom²"]
    assert rows[1]["method"] == "globalcom2" and rows[1]["retention_ratio"] == "0.25"
    assert float(rows[1]["MME"]) == 1493.5 and float(rows[1]["MME (%)"]) == pytest.approx(98.3213, abs=1e-4)
    assert float(rows[0]["average (%)"]) == 100.0 and rows[1]["n_relative"] == "6"


def test_rows_by_ratio_then_order_merged_runs_and_options(tmp_path, runs, capsys):
    ck = "pretrained=/ckpt"
    half = {"gqa": {"exact_match,none": 0.63}}
    paths = [
        write_results(
            tmp_path / "f25" / "a_results.json",
            {"gqa": {"exact_match,none": 0.5}},
            "globalcom2",
            f"{ck},method=fastv,retention_ratio=0.25,k=3,batch_size=8",
        ),
        write_results(tmp_path / "g50" / "a_results.json", half, "globalcom2", f"{ck},retention_ratio=0.5"),
        # a second file of the same configuration (another benchmark, another batch size) joins its row
        write_results(
            tmp_path / "g50" / "b_results.json",
            {"mme": {"mme_perception_score,none": 1500.0}},
            "globalcom2",
            f"{ck},retention_ratio=0.5,batch_size=4",
        ),
    ]
    assert report.main([str(runs["g25"]), str(paths[0]), str(tmp_path / "g50"), str(runs["stock"])]) == 0
    md = capsys.readouterr().out
    labels = [line.split("|")[1].strip() for line in md.splitlines()[2:]]
    assert labels == ["Stock", "GlobalCom²", "GlobalCom²", "FastV (k=3)"]
    assert [line.split("|")[2].strip() for line in md.splitlines()[2:]] == ["100%", "50%", "25%", "25%"]
    g50 = md.splitlines()[3]
    assert "63.0" in g50 and "1500.0" in g50
    assert f"{100 * (63 / 64.2 + 1500 / 1519) / 2:.1f}%" in g50  # Avg. over the benchmarks this row has


def test_other_lmms_eval_model_is_the_stock_row_and_labels(tmp_path, runs, capsys):
    hf = write_results(tmp_path / "hf_results.json", STOCK, "llava_hf", "pretrained=llava-hf/llava-v1.6-vicuna-7b-hf")
    assert report.main([str(hf), str(runs["g25"]), "--label", f"{runs['g25']}=ours @ 25%"]) == 0
    md = capsys.readouterr().out
    assert cells(md, "Stock")[-1] == "100.0%" and cells(md, "ours @ 25%")[-1] == "96.2%"


def test_task_and_metric_mapping(tmp_path, capsys):
    stock = write_results(tmp_path / "s_results.json", {"pope_lite": {"pope_accuracy,none": 0.8}}, "llava_hf")
    comp = write_results(
        tmp_path / "c_results.json",
        {"pope_lite": {"pope_accuracy,none": 0.6}},
        "globalcom2",
        "pretrained=/x,method=fastervlm,retention_ratio=0.1",
    )
    args = [str(stock), str(comp), "--task", "pope_lite=pope", "--metric", "POPE=pope_accuracy"]
    assert report.main(args) == 0
    md = capsys.readouterr().out
    assert cells(md, "FasterVLM") == ["FasterVLM", "10%", "60.0", "75.0%"]


def test_baseline_errors_and_choice(tmp_path, runs, capsys):
    with pytest.raises(SystemExit):
        report.main([str(runs["g25"])])  # no stock run
    assert "no stock run" in capsys.readouterr().err
    assert report.main([str(runs["g25"]), "--baseline", "GlobalCom²"]) == 0
    assert cells(capsys.readouterr().out, "GlobalCom²")[-1] == "100.0%"
    other = write_results(tmp_path / "x_results.json", STOCK, "llava_hf")
    assert report.main([str(runs["stock"]), str(other), str(runs["g25"])]) == 0  # stock files form one row
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 4 and "MME given more than once" in captured.err
    with pytest.raises(SystemExit):
        report.main([str(runs["stock"]), str(other), "--label", f"{other}=stock (hf)"])  # two stock rows
    assert "2 stock rows" in capsys.readouterr().err
    assert report.main([str(runs["stock"]), str(other), "--label", f"{other}=hf", "--baseline", "hf"]) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [("not json", "cannot read"), ('{"x": 1}', "no 'results'"), ('{"results": {"foo": {}}}', "--task TASK=COLUMN")],
)
def test_bad_inputs_are_clear(tmp_path, content, message, capsys):
    bad = tmp_path / "bad_results.json"
    bad.write_text(content)
    with pytest.raises(SystemExit):
        report.main([str(bad), "--baseline", "Stock"])
    assert message in capsys.readouterr().err


def test_missing_path_and_unknown_label(tmp_path, runs, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "nope")])
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(runs["stock"]), "--label", "elsewhere.json=x"])
    assert "not among RESULTS" in capsys.readouterr().err


def test_zero_stock_score_has_no_relative(tmp_path, capsys):
    s = write_results(tmp_path / "s_results.json", {"mme": {"mme_perception_score,none": 0.0}}, "llava_hf")
    c = write_results(tmp_path / "c_results.json", {"mme": {"mme_perception_score,none": 10.0}}, "globalcom2", "")
    assert report.main([str(s), str(c)]) == 0
    captured = capsys.readouterr()
    assert cells(captured.out, "GlobalCom²")[-1] == "–"
    assert "stock MME score is 0" in captured.err


def test_cli_routes_report(runs, capsys):
    assert cli.main(["report", str(runs["stock"]), str(runs["g25"])]) == 0
    assert "| GlobalCom² | 25% |" in capsys.readouterr().out
