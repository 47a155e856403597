"""An experiment's results written out: per-request CSV, per-run summary CSV, a markdown
section (the PNG plots are bench/plots.py; bench/output.py writes both). No matplotlib here.

Shapes read (an "experiment" document, built by the experiment runner):

    experiment = {
        "name": str,                      # used in file names
        "workload": {"name": str, "summary": {...}, "params": {...}},
        "machine": {...}, "command": str,
        "runs": [                         # one per cluster configuration, in order
            {"label": str, "mode": str, "policy": str,
             "instances": {"prefill": int, "decode": int, "colocated": int},
             "summary": summarize(records, wall_s),
             "records": [{"session", "turn", "sent_s", "ttft_s", "tpot_s", "jct_s",
                          "prompt", "cached", "output", "instances": [str], "error": str}]},
        ],
        "comparisons": [compare(...), ...],
    }

A record with a non-empty "error" is a failed request: counted, but left out of every
latency, token and hit-rate figure. Documents read back from JSON carry null where a
figure was NaN, so every reader here treats None as NaN.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.report import fmt, latency_summary_ms, percentile, ratio

Experiment = Mapping[str, Any]

LATENCIES = ("ttft", "tpot", "jct")
LATENCY_STATS = ("mean_ms", "p50_ms", "p99_ms", "max_ms")  # keys of latency_summary_ms
# summarize() adds "p999_ms" (the tail KunServe reports): after them in the summary CSV.
COMPARED = {  # comparison metric -> (latency, statistic)
    "ttft_mean": ("ttft", "mean_ms"),
    "ttft_p99": ("ttft", "p99_ms"),
    "jct_mean": ("jct", "mean_ms"),
    "jct_p99": ("jct", "p99_ms"),
}
COMPARED_WORDS = {
    "ttft_mean": "mean TTFT",
    "ttft_p99": "P99 TTFT",
    "jct_mean": "mean JCT",
    "jct_p99": "P99 JCT",
}
RUN_FIELDS = ("label", "mode", "policy")
RECORD_FIELDS = (
    "session",
    "turn",
    "sent_s",
    "ttft_s",
    "tpot_s",
    "jct_s",
    "prompt",
    "cached",
    "output",
    "instances",
    "error",
)
MD_HEADERS = (
    "run",
    "requests",
    "errors",
    "TTFT mean ms",
    "TTFT p99 ms",
    "TPOT mean ms",
    "JCT mean ms",
    "JCT p99 ms",
    "hit %",
)


# ---------------------------------------------------------------- numbers


def num(value: Any) -> float:
    """A figure as a float; None (JSON's stand-in for NaN) and non-numbers become NaN."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    return float(value)


def ok_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The records of requests that succeeded (empty or missing "error")."""
    return [r for r in records if not r.get("error")]


def _finite(records: Iterable[Mapping[str, Any]], key: str) -> list[float]:
    # A succeeded request may still lack a figure (e.g. no TPOT for a one-token answer).
    values = (num(r.get(key)) for r in records)
    return [v for v in values if math.isfinite(v)]


def _total(records: Iterable[Mapping[str, Any]], key: str) -> int:
    return sum(int(r.get(key) or 0) for r in records)


def summarize(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """A run's summary: counts, rates over `wall_s`, latency stats and hit rate (ok only)."""
    ok = ok_records(records)
    prompt = _total(ok, "prompt")
    return {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "wall_s": wall_s,
        "rps": ratio(len(ok), wall_s),
        "output_tok_s": ratio(_total(ok, "output"), wall_s),
        **{lat: _latency(_finite(ok, f"{lat}_s")) for lat in LATENCIES},
        "hit_rate": _total(ok, "cached") / prompt if prompt else 0.0,
    }


def _latency(seconds: list[float]) -> dict[str, float]:
    out = latency_summary_ms(seconds)
    out["p999_ms"] = 1e3 * percentile(seconds, 99.9) if seconds else math.nan
    return out


def stat(summary: Mapping[str, Any], latency: str, key: str) -> float:
    """summary[latency][key] as a float, NaN where absent."""
    return num((summary.get(latency) or {}).get(key))


def fraction_lower(base: float, new: float) -> float:
    """(base - new) / base: how much lower `new` is; NaN when base is not a positive number."""
    if not math.isfinite(base) or base <= 0:
        return math.nan
    return (base - new) / base


def compare(
    runs_by_label: Mapping[str, Mapping[str, Any]],
    name: str,
    base: str,
    new: str,
    paper: Mapping[str, float] | None = None,
) -> dict[str, Any] | None:
    """The comparison entry of `new` against `base` (run labels); None if either is missing."""
    if base not in runs_by_label or new not in runs_by_label:
        return None
    b = runs_by_label[base].get("summary") or {}
    n = runs_by_label[new].get("summary") or {}
    metrics = {
        metric: fraction_lower(stat(b, lat, key), stat(n, lat, key))
        for metric, (lat, key) in COMPARED.items()
    }
    return {"name": name, "base": base, "new": new, "metrics": metrics, "paper": dict(paper or {})}


# ---------------------------------------------------------------- CSV


def _cell(value: Any) -> Any:
    # Empty cells for missing figures, so spreadsheets read them as blanks, not text.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, list | tuple):
        return "+".join(str(v) for v in value)
    return value


def _write_rows(path: str | Path, fields: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: _cell(row.get(k)) for k in fields})
    return p


def _runs(experiment: Experiment) -> list[Mapping[str, Any]]:
    return list(experiment.get("runs") or [])


def write_csv(experiment: Experiment, path: str | Path) -> Path:
    """One row per request record, the run's label/mode/policy first; instances joined by +."""
    fields = [*RUN_FIELDS, *RECORD_FIELDS]
    # Fields the runner added beyond the documented ones are kept, after them.
    for run in _runs(experiment):
        for rec in run.get("records") or []:
            fields.extend(k for k in rec if k not in fields)
    rows = (
        {**rec, **{k: run.get(k) for k in RUN_FIELDS}}
        for run in _runs(experiment)
        for rec in run.get("records") or []
    )
    return _write_rows(path, fields, rows)


SUMMARY_FIELDS = (
    *RUN_FIELDS,
    "prefill",
    "decode",
    "colocated",
    "requests",
    "errors",
    "wall_s",
    "rps",
    "output_tok_s",
    "hit_rate",
    *(f"{lat}_{key}" for lat in LATENCIES for key in LATENCY_STATS),
)


def summary_row(run: Mapping[str, Any]) -> dict[str, Any]:
    """A run flattened: label/mode/policy, instance counts, summary with ttft_mean_ms etc."""
    summary = run.get("summary") or {}
    row: dict[str, Any] = {k: run.get(k) for k in RUN_FIELDS}
    row.update(run.get("instances") or {})
    row.update({k: v for k, v in summary.items() if not isinstance(v, Mapping)})
    for lat in LATENCIES:
        row.update({f"{lat}_{k}": v for k, v in (summary.get(lat) or {}).items()})
    return row


def write_summary_csv(experiment: Experiment, path: str | Path) -> Path:
    """One row per run: the flattened summary (see summary_row)."""
    rows = [summary_row(run) for run in _runs(experiment)]
    fields = list(SUMMARY_FIELDS)
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    return _write_rows(path, fields, rows)


# ---------------------------------------------------------------- markdown


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def workload_line(experiment: Experiment) -> str:
    """One line naming the workload and its scalar summary figures (params if no summary)."""
    workload = experiment.get("workload") or {}
    figures = workload.get("summary") or workload.get("params") or {}
    parts = [
        f"{k.replace('_', ' ')} {fmt(int(v) if isinstance(v, float) and v.is_integer() else v, 1)}"
        for k, v in figures.items()
        if isinstance(v, str | int | float) and not isinstance(v, bool)
    ]
    text = f"Workload `{workload.get('name', '?')}`"
    return f"{text}: {', '.join(parts)}." if parts else f"{text}."


def _run_row(run: Mapping[str, Any]) -> list[str]:
    s = run.get("summary") or {}
    return [
        _md_cell(run.get("label", "")),
        fmt(s.get("requests")),
        fmt(s.get("errors")),
        fmt(stat(s, "ttft", "mean_ms")),
        fmt(stat(s, "ttft", "p99_ms")),
        fmt(stat(s, "tpot", "mean_ms")),
        fmt(stat(s, "jct", "mean_ms")),
        fmt(stat(s, "jct", "p99_ms")),
        fmt(100 * num(s.get("hit_rate"))),
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-markdown table, numbers (every column but the first) right-aligned."""
    rule = ["---", *("--:" for _ in headers[1:])]
    lines = [headers, rule, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def percent_change(fraction: float) -> str:
    """0.41 -> '41.0% lower', -0.1 -> '10.0% higher', NaN -> 'n/a'."""
    if not math.isfinite(fraction):
        return "n/a"
    return f"{100 * abs(fraction):.1f}% {'lower' if fraction >= 0 else 'higher'}"


def comparison_line(comp: Mapping[str, Any]) -> str:
    """'name: new vs base — mean TTFT 41.0% lower (paper 58%), P99 TTFT …, …'."""
    metrics = comp.get("metrics") or {}
    paper = comp.get("paper") or {}
    parts = []
    for metric, words in COMPARED_WORDS.items():
        if metric not in metrics:
            continue
        part = f"{words} {percent_change(num(metrics[metric]))}"
        if math.isfinite(num(paper.get(metric))):
            part += f" (paper {100 * num(paper[metric]):.3g}%)"
        parts.append(part)
    return f"{comp.get('name')}: {comp.get('new')} vs {comp.get('base')} — {', '.join(parts)}"


def markdown(experiment: Experiment) -> str:
    """The experiment as a markdown section: heading, workload line, run table, comparisons."""
    rows = [_run_row(run) for run in _runs(experiment)]
    out = [
        f"### {experiment.get('name', 'experiment')}",
        "",
        workload_line(experiment),
        "",
        markdown_table(MD_HEADERS, rows),
    ]
    comparisons = experiment.get("comparisons") or []
    if comparisons:
        out.append("")
        out.extend(f"- {comparison_line(c)}" for c in comparisons)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- all files


def file_stem(name: str) -> str:
    """The experiment name made safe as a file name (no separators or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "experiment"
