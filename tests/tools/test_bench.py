"""The measured benchmark runs end to end on a tiny configuration (no timing is asserted)."""

import csv
import json

import pytest

from globalcom2.tools import bench


def test_bench_runs_end_to_end_and_kv_matches_prediction(tmp_path, capsys):
    out_json, out_csv, out_png = tmp_path / "b.json", tmp_path / "b.csv", tmp_path / "b.png"
    argv = ["--tiny", "--repeats", "1", "--decode-tokens", "2", "--methods", "globalcom2", "fastervlm", "fastv",
            "--ratios", "0.5", "0.25", "--json", str(out_json), "--csv", str(out_csv), "--plot", str(out_png),
            "--extrapolate-layers", "32", "--quiet"]  # fmt: skip
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Eq. 8" in printed and "EXTRAPOLATED" in printed
    rows = json.loads(out_json.read_text())
    assert [(r["method"], r["ratio"]) for r in rows][:3] == [("stock", 1.0), ("globalcom2", 0.5), ("globalcom2", 0.25)]
    assert len(rows) == 1 + 3 * 2
    for r in rows:
        assert r["kv_mb"] == pytest.approx(r["kv_pred_mb"], rel=0, abs=1e-12)  # measured == analytic
        assert r["prefill_ms"] > 0 and r["vision_ms"] > 0
    stock = rows[0]
    for r in rows[1:]:
        assert r["visual_tokens"] < stock["visual_tokens"]
        assert r["kv_mb"] < stock["kv_mb"]
        assert r["eq8_speedup"] > 1
    assert len(list(csv.DictReader(out_csv.open()))) == len(rows)
    assert out_png.stat().st_size > 0


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--ratios", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--methods", "nope", "--repeats", "1", "--quiet"])
    (line,) = capsys.readouterr().err.splitlines()[-1:]
    assert line.startswith("globalcom2 bench: error: --methods nope: method must be one of")


def test_bench_loads_a_local_checkpoint(tmp_path, capsys):
    from globalcom2.testing.tiny import tiny_model, tiny_processor

    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    tiny_processor().save_pretrained(ckpt)
    argv = ["--model", str(ckpt), "--repeats", "1", "--methods", "globalcom2", "--ratios", "0.5", "--decode-tokens",
            "1", "--quiet", "--dtype", "float32", "--device", "cpu"]  # fmt: skip
    assert bench.main(argv) == 0
    assert f"local checkpoint {ckpt}" in capsys.readouterr().out
