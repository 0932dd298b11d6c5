"""``globalcom2 report``: lmms-eval result files -> the paper's accuracy table (Tables II/III layout).

One row per run configuration (the stock model first, then each method and retention ratio), one
column per benchmark with its headline score, and ``Avg.``: the mean over benchmarks of
score / stock score, in percent. Prints Markdown; ``--csv`` / ``--markdown`` write files.

    globalcom2 report runs/stock runs/globalcom2_r25 runs/fastv_r25 --csv table.csv
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .model_args import LOADER_ARGS, STOCK_METHODS, coerce


@dataclass(frozen=True)
class Benchmark:
    """A paper column: the lmms-eval tasks that feed it, the metric read, and the factor to the paper's scale."""

    column: str
    tasks: tuple[str, ...]
    metric: str
    scale: float = 1.0
    decimals: int = 1


#: The paper's columns in order. lmms-eval scores fractions (0-1) for VQA accuracy and POPE F1; MME is the sum
#: of the perception subtasks (e.g. 1519.0); MMBench and MM-Vet are already percentages.
BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("GQA", ("gqa",), "exact_match", 100.0),
    Benchmark("VQAv2", ("vqav2_val",), "exact_match", 100.0),
    Benchmark("VizWiz", ("vizwiz_vqa_val",), "exact_match", 100.0),
    Benchmark("SQA-IMG", ("scienceqa_img",), "exact_match", 100.0),
    Benchmark("TextVQA", ("textvqa_val",), "exact_match", 100.0),
    Benchmark("POPE", ("pope",), "pope_f1_score", 100.0),
    Benchmark("MME", ("mme",), "mme_perception_score", 1.0),
    Benchmark("MMB", ("mmbench_en_dev",), "gpt_eval_score", 1.0),
    Benchmark("MMB-CN", ("mmbench_cn_dev",), "gpt_eval_score", 1.0),
    Benchmark("MM-Vet", ("mmvet",), "gpt_eval_score", 1.0),
)

STOCK = "none"
DISPLAY = {STOCK: "Stock", "globalcom2": "GlobalCom²", "fastervlm": "FasterVLM", "fastv": "FastV"}
DISPLAY.update({"visionzip": "VisionZip", "divprune": "DivPrune", "dart": "DART", "cdpruner": "CDPruner"})


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def find_benchmark(name: str, benchmarks: Sequence[Benchmark] = BENCHMARKS) -> Benchmark:
    """The column called ``name`` ("MMB-CN", "mmb_cn", "mme", ...) or holding task ``name``."""
    for b in benchmarks:
        if _key(b.column) == _key(name) or name in b.tasks:
            return b
    raise ValueError(f"unknown benchmark {name!r}; columns: {', '.join(b.column for b in benchmarks)}")


# ------------------------------------------------------------------------------------------ reading


def parse_model_args(model_args: str | dict[str, Any] | None) -> dict[str, Any]:
    """``"a=1,b=x"`` (or a dict) -> ``{"a": 1, "b": "x"}`` with lmms-eval's value types."""
    if isinstance(model_args, dict):
        return {str(k): coerce(v) for k, v in model_args.items()}
    out: dict[str, Any] = {}
    for part in (model_args or "").split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key.strip()] = coerce(value.strip())
    return out


def _fmt_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass
class Run:
    """One lmms-eval results file: which configuration produced it and the aggregated metrics per task."""

    path: Path
    model: str
    method: str
    retention_ratio: float
    options: dict[str, Any]
    results: dict[str, dict[str, Any]]
    label: str | None = None
    checkpoint: str | None = None  # model_args ``pretrained``: which model the run scored

    @property
    def row_key(self) -> tuple:
        """Runs with equal keys are one table row (e.g. one lmms-eval call per benchmark)."""
        if self.label is not None:
            return ("label", self.label)
        return (self.method, round(self.retention_ratio, 6), tuple(sorted(self.options.items())))

    @property
    def default_label(self) -> str:
        """e.g. ``GlobalCom²``, ``FastV (k=3)``, ``Stock``."""
        name = DISPLAY.get(self.method, self.method)
        if self.options:
            name += " (" + ", ".join(f"{k}={_fmt_value(v)}" for k, v in sorted(self.options.items())) + ")"
        return name


def load_run(path: str | Path, label: str | None = None) -> Run:
    """Read one lmms-eval ``*_results.json``; the run's model_args give the method and retention ratio.

    ``--model globalcom2`` runs with ``method=none``/``stock`` and runs of any other lmms-eval model
    (e.g. ``llava_hf``) are the stock model.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read an lmms-eval results file ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{path}: not an lmms-eval results file (no 'results' object)")
    config = data.get("config") or {}
    model = str(config.get("model") or "")
    args = parse_model_args(config.get("model_args"))
    method = str(args.get("method", "globalcom2")) if model == "globalcom2" else STOCK
    if method.lower() in STOCK_METHODS:
        method = STOCK
    if method == STOCK:
        ratio, options = 1.0, {}
    else:
        ratio = args.get("retention_ratio")
        if ratio is None:
            from ..methods import make_config

            ratio = make_config(method).retention_ratio
        ratio = float(ratio)
        options = {k: v for k, v in args.items() if k not in LOADER_ARGS and k != "retention_ratio"}
    pretrained = args.get("pretrained")
    return Run(
        path, model, method, ratio, options, data["results"], label, None if pretrained is None else str(pretrained)
    )


def metric_value(task_results: dict[str, Any], metric: str) -> float | None:
    """The aggregated ``metric`` of one task (key ``metric,FILTER``, filter "none" preferred), or None."""
    candidates = [k for k in task_results if k == metric or k.split(",", 1)[0] == metric]
    candidates.sort(key=lambda k: (k != f"{metric},none", k))
    for k in candidates:
        v = task_results[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            continue
        return float(v)
    return None


def expand_paths(items: Iterable[str]) -> list[tuple[str, Path]]:
    """Each RESULTS argument with the files it names: a file, or every ``*_results.json`` under a directory."""
    out = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files = sorted(p.rglob("*_results.json"))
            if not files:
                raise ValueError(f"{item}: no lmms-eval *_results.json under this directory")
            out.extend((item, f) for f in files)
        elif p.is_file():
            out.append((item, p))
        else:
            raise ValueError(f"{item}: no such file or directory")
    return out


# ------------------------------------------------------------------------------------------ the table


@dataclass
class Row:
    """One line of the table: a configuration and its score per column."""

    label: str
    method: str
    retention_ratio: float
    options: dict[str, Any]
    scores: dict[str, float] = field(default_factory=dict)
    relative: dict[str, float] = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)

    @property
    def average(self) -> float | None:
        """Mean relative score (%) over the benchmarks that this row and the stock row both have."""
        vals = list(self.relative.values())
        return sum(vals) / len(vals) if vals else None


@dataclass
class Table:
    """The report: columns present in any run, the stock row first, then compressed rows."""

    columns: list[Benchmark]
    rows: list[Row]
    baseline: Row
    warnings: list[str] = field(default_factory=list)


def build_table(
    runs: Sequence[Run],
    benchmarks: Sequence[Benchmark] = BENCHMARKS,
    baseline: str | None = None,
) -> Table:
    """Group runs into rows, read each benchmark's headline score, and compute scores relative to the stock row."""
    warnings: list[str] = []
    checkpoints = sorted({r.checkpoint for r in runs if r.checkpoint is not None and r.label is None})
    if len(checkpoints) > 1:  # e.g. a local path and the Hub name of the same model; or two models by mistake
        warnings.append(
            f"the results name {len(checkpoints)} checkpoints ({', '.join(checkpoints)}); rows are grouped by method "
            "and options only, and every row is compared with one stock row: report one model at a time"
        )
    rows: dict[tuple, Row] = {}
    for run in runs:
        row = rows.get(run.row_key)
        if row is None:
            row = Row(run.label or run.default_label, run.method, run.retention_ratio, dict(run.options))
            rows[run.row_key] = row
        row.sources.append(run.path)
        for b in benchmarks:
            for task in b.tasks:
                if task not in run.results:
                    continue
                value = metric_value(run.results[task], b.metric)
                if value is None:
                    warnings.append(f"{run.path}: task {task} has no numeric {b.metric}; skipped")
                    continue
                if b.column in row.scores:
                    warnings.append(f"{row.label}: {b.column} given more than once; using {run.path}")
                row.scores[b.column] = value * b.scale

    if not rows:
        raise ValueError("no results files given")
    base = _pick_baseline(list(rows.values()), baseline)
    columns = [b for b in benchmarks if any(b.column in r.scores for r in rows.values())]
    if not columns:
        known = ", ".join(t for b in benchmarks for t in b.tasks)
        found = sorted({t for run in runs for t in run.results})
        raise ValueError(
            f"none of the results has a benchmark of the table (tasks: {known}); found {', '.join(found)}. "
            "Map other task names with --task TASK=COLUMN"
        )
    for row in rows.values():
        for b in columns:
            ref, value = base.scores.get(b.column), row.scores.get(b.column)
            if ref is None or value is None:
                continue
            if ref == 0:
                warnings.append(f"stock {b.column} score is 0: no relative score for it")
                continue
            row.relative[b.column] = 100.0 * value / ref
        missing = [b.column for b in columns if b.column in base.scores and b.column not in row.scores]
        if missing and row is not base:
            warnings.append(f"{row.label} ({_pct(row.retention_ratio)}): no {', '.join(missing)}; Avg. leaves them out")
    others = [r for r in rows.values() if r is not base]
    order = {id(r): i for i, r in enumerate(others)}
    others.sort(key=lambda r: (-r.retention_ratio, order[id(r)]))
    return Table(columns, [base, *others], base, list(dict.fromkeys(warnings)))


def _pick_baseline(rows: list[Row], baseline: str | None) -> Row:
    if baseline is not None:
        hits = [r for r in rows if r.label == baseline or _key(r.label) == _key(baseline)]
        if len(hits) != 1:
            raise ValueError(
                f"--baseline {baseline!r} matches {len(hits)} rows; rows: {', '.join(r.label for r in rows)}"
            )
        return hits[0]
    stock = [r for r in rows if r.method == STOCK]
    if len(stock) == 1:
        return stock[0]
    if not stock:
        raise ValueError(
            "no stock run among the results (a --model globalcom2 run with method=none, or a run of another "
            "lmms-eval model such as llava_hf); add one, or name the reference row with --baseline LABEL"
        )
    raise ValueError(
        f"{len(stock)} stock rows ({', '.join(r.label for r in stock)}): give them one --label or pick --baseline"
    )


# ------------------------------------------------------------------------------------------ output


def _pct(ratio: float) -> str:
    return f"{100 * ratio:.4g}%"


def _num(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:.{decimals}f}"


def to_markdown(table: Table, relative: bool = False) -> str:
    """The table as GitHub Markdown; with ``relative`` each cell also shows its share of the stock score."""
    head = ["Method", "R", *[b.column for b in table.columns], "Avg."]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---", "---:"] + ["---:"] * (len(head) - 2)) + "|"]
    for row in table.rows:
        cells = [row.label, _pct(row.retention_ratio)]
        for b in table.columns:
            cell = _num(row.scores.get(b.column), b.decimals)
            if relative and row is not table.baseline and b.column in row.relative:
                cell += f" ({row.relative[b.column]:.1f}%)"
            cells.append(cell)
        avg = row.average
        cells.append("–" if avg is None else f"{avg:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The table as CSV: scores, relative scores (%) and the average, unrounded to 4 decimals."""
    cols = [b.column for b in table.columns]
    head = ["label", "method", "retention_ratio", "options", *cols, *[f"{c} (%)" for c in cols]]
    head += ["average (%)", "n_relative"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)

    def r4(v: float | None) -> str:
        return "" if v is None else f"{v:.4f}"

    for row in table.rows:
        opts = ";".join(f"{k}={_fmt_value(v)}" for k, v in sorted(row.options.items()))
        w.writerow(
            [row.label, row.method, f"{row.retention_ratio:g}", opts]
            + [r4(row.scores.get(c)) for c in cols]
            + [r4(row.relative.get(c)) for c in cols]
            + [r4(row.average), len(row.relative)]
        )
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ command line


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} takes NAME=VALUE, got {item!r}")
        k, v = item.rsplit("=", 1)
        out.append((k, v))
    return out


def _benchmarks(task_maps: list[tuple[str, str]], metric_maps: list[tuple[str, str]]) -> tuple[Benchmark, ...]:
    """The paper's columns with extra task names (--task) and replaced metrics (--metric)."""
    cols = {b.column: b for b in BENCHMARKS}
    for task, col in task_maps:
        b = find_benchmark(col)
        cols[b.column] = Benchmark(b.column, (*cols[b.column].tasks, task), b.metric, b.scale, b.decimals)
    for col, metric in metric_maps:
        b = cols[find_benchmark(col).column]
        cols[b.column] = Benchmark(b.column, b.tasks, metric, b.scale, b.decimals)
    return tuple(cols[b.column] for b in BENCHMARKS)


def main(argv: list[str] | None = None) -> int:
    """``globalcom2 report RESULTS... [--label PATH=LABEL] [--task TASK=COLUMN] [--csv F] [--markdown F]``."""
    from .common import Parser

    parser = Parser(
        prog="globalcom2 report",
        description="Paper-style accuracy table (scores and average relative score) from lmms-eval result files.",
        epilog="Columns: "
        + "; ".join(
            f"{b.column} = {'/'.join(b.tasks)} {b.metric}" + (" x100" if b.scale != 1 else "") for b in BENCHMARKS
        ),
    )
    parser.add_argument("results", nargs="+", help="lmms-eval *_results.json files, or directories holding them")
    parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="PATH=LABEL",
        help="row label for the runs of PATH (as given in RESULTS); runs with one label form one row",
    )
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="TASK=COLUMN",
        help="also read lmms-eval task TASK into COLUMN (e.g. mmbench_en_dev_lite=MMB)",
    )
    parser.add_argument(
        "--metric",
        action="append",
        default=[],
        metavar="COLUMN=METRIC",
        help="read METRIC instead of the default for COLUMN (e.g. POPE=pope_accuracy)",
    )
    parser.add_argument("--baseline", metavar="LABEL", help="the reference row (default: the stock run)")
    parser.add_argument("--relative", action="store_true", help="show each score's share of the stock score")
    parser.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    parser.add_argument("--markdown", metavar="PATH", help="also write the Markdown table to a file")
    args = parser.parse_args(argv)
    try:
        labels = dict(_pairs(args.label, "--label"))
        benchmarks = _benchmarks(_pairs(args.task, "--task"), _pairs(args.metric, "--metric"))
        files = expand_paths(args.results)
        unknown = set(labels) - {given for given, _ in files} - {str(p) for _, p in files}
        if unknown:
            raise ValueError(f"--label names {', '.join(sorted(unknown))}, which is not among RESULTS")
        runs = [load_run(p, labels.get(given, labels.get(str(p)))) for given, p in files]
        table = build_table(runs, benchmarks, args.baseline)
    except ValueError as err:
        parser.error(str(err))
    md = to_markdown(table, relative=args.relative)
    sys.stdout.write(md)
    for w in table.warnings:
        print(f"note: {w}", file=sys.stderr)
    if args.markdown:
        Path(args.markdown).write_text(md, encoding="utf-8")
    if args.csv:
        Path(args.csv).write_text(to_csv(table), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
