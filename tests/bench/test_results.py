"""bench/results.py and bench/plots.py on a synthetic experiment: summaries against hand
computations, comparisons, and every file write_all produces (CSV, markdown, PNG)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench.output import write_all
from bench.results import (
    compare,
    markdown,
    percent_change,
    summarize,
    write_csv,
    write_summary_csv,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(
    ttft: float,
    jct: float,
    *,
    prompt: int = 100,
    cached: int = 0,
    output: int = 10,
    error: str = "",
    session: str = "chat-0000",
    turn: int = 0,
) -> dict[str, Any]:
    return {
        "session": session,
        "turn": turn,
        "sent_s": 0.0,
        "ttft_s": ttft,
        "tpot_s": (jct - ttft) / max(output - 1, 1),
        "jct_s": jct,
        "prompt": prompt,
        "cached": cached,
        "output": output,
        "instances": ["prefill-0", "decode-0"],
        "error": error,
    }


def run(label: str, records: list[dict[str, Any]], wall_s: float = 2.0) -> dict[str, Any]:
    return {
        "label": label,
        "mode": label,
        "policy": "locality",
        "instances": {"prefill": 1, "decode": 1, "colocated": 0},
        "summary": summarize(records, wall_s),
        "records": records,
    }


BASE_RECORDS = [
    record(0.1, 0.5, prompt=100, cached=0, output=10, turn=0),
    record(0.2, 0.6, prompt=200, cached=0, output=20, turn=1),
    record(0.3, 0.7, prompt=300, cached=0, output=30, turn=2),
    record(9.9, 9.9, prompt=400, cached=400, output=0, error="timeout", turn=3),
]
NEW_RECORDS = [
    record(0.05, 0.4, prompt=100, cached=0, output=10, turn=0),
    record(0.1, 0.5, prompt=200, cached=100, output=20, turn=1),
    record(0.15, 0.6, prompt=300, cached=200, output=30, turn=2),
    record(0.2, 0.7, prompt=400, cached=300, output=40, turn=3),
]
FAILED_RECORDS = [record(1.0, 2.0, error="overloaded"), record(1.0, 2.0, error="dead instance")]


@pytest.fixture
def experiment() -> dict[str, Any]:
    runs = [
        run("pd-basic", BASE_RECORDS),
        run("pd-caching-3", NEW_RECORDS, wall_s=4.0),
        run("all-failed", FAILED_RECORDS),  # zero ok records: plots must still draw it
    ]
    by_label = {r["label"]: r for r in runs}
    comp = compare(by_label, "caching (PD)", "pd-basic", "pd-caching-3", {"ttft_mean": 0.58})
    return {
        "name": "chat-caching",
        "workload": {"name": "chat", "summary": {"sessions": 2, "turns": 4}, "params": {}},
        "machine": {"cpu_count": 2},
        "command": "memserve bench serve --workload chat",
        "runs": runs,
        "comparisons": [comp],
    }


def test_summarize_matches_hand_computation() -> None:
    s = summarize(BASE_RECORDS, wall_s=2.0)
    assert s["requests"] == 4 and s["errors"] == 1
    assert s["wall_s"] == 2.0
    assert s["rps"] == pytest.approx(3 / 2.0)  # the failed request is not counted
    assert s["output_tok_s"] == pytest.approx((10 + 20 + 30) / 2.0)
    assert s["hit_rate"] == 0.0  # the failed request's 400 cached tokens are left out
    assert s["ttft"]["mean_ms"] == pytest.approx(200.0)
    assert s["ttft"]["p50_ms"] == pytest.approx(200.0)
    assert s["ttft"]["p99_ms"] == pytest.approx(298.0)  # 200 + 0.98 * 100, interpolated
    assert s["ttft"]["max_ms"] == pytest.approx(300.0)
    assert s["jct"]["mean_ms"] == pytest.approx(600.0)
    # tpot = (jct - ttft) / (output - 1): 400/9, 400/19, 400/29 ms
    assert s["tpot"]["mean_ms"] == pytest.approx((400 / 9 + 400 / 19 + 400 / 29) / 3)

    s = summarize(NEW_RECORDS, wall_s=4.0)
    assert s["hit_rate"] == pytest.approx(600 / 1000)
    assert s["rps"] == pytest.approx(1.0)


def test_summarize_without_ok_records() -> None:
    s = summarize(FAILED_RECORDS, wall_s=1.0)
    assert s["requests"] == 2 and s["errors"] == 2
    assert s["rps"] == 0.0 and s["hit_rate"] == 0.0
    assert math.isnan(s["ttft"]["mean_ms"])
    s = summarize([], wall_s=0.0)
    assert s["requests"] == 0 and math.isnan(s["rps"])


def test_compare_fractions_and_missing_label(experiment: dict[str, Any]) -> None:
    comp = experiment["comparisons"][0]
    assert comp["name"] == "caching (PD)"
    assert (comp["base"], comp["new"]) == ("pd-basic", "pd-caching-3")
    m = comp["metrics"]
    assert m["ttft_mean"] == pytest.approx((200 - 125) / 200)
    assert m["jct_mean"] == pytest.approx((600 - 550) / 600)
    assert m["ttft_p99"] == pytest.approx((298 - 198.5) / 298)  # new p99: 150 + 0.97 * 50
    assert m["jct_p99"] == pytest.approx((698 - 697) / 698)
    assert comp["paper"] == {"ttft_mean": 0.58}

    by_label = {r["label"]: r for r in experiment["runs"]}
    assert compare(by_label, "x", "pd-basic", "nope") is None
    assert compare(by_label, "x", "nope", "pd-basic") is None
    # A base with no figures (NaN) or a zero base gives NaN, not an exception.
    nan_comp = compare(by_label, "x", "all-failed", "pd-basic")
    assert nan_comp is not None and math.isnan(nan_comp["metrics"]["ttft_mean"])
    assert nan_comp["paper"] == {}


def test_percent_change_words() -> None:
    assert percent_change(0.41) == "41.0% lower"
    assert percent_change(-0.125) == "12.5% higher"
    assert percent_change(math.nan) == "n/a"


def test_csv_files(experiment: dict[str, Any], tmp_path: Path) -> None:
    with write_csv(experiment, tmp_path / "r.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(BASE_RECORDS) + len(NEW_RECORDS) + len(FAILED_RECORDS)
    assert list(rows[0])[:4] == ["label", "mode", "policy", "session"]
    assert rows[0]["label"] == "pd-basic" and rows[-1]["label"] == "all-failed"
    assert rows[0]["instances"] == "prefill-0+decode-0"
    assert rows[3]["error"] == "timeout"

    with write_summary_csv(experiment, tmp_path / "s.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert [r["label"] for r in summary] == ["pd-basic", "pd-caching-3", "all-failed"]
    for key in ("ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms", "tpot_mean_ms", "jct_mean_ms"):
        assert key in summary[0]
    assert float(summary[0]["ttft_mean_ms"]) == pytest.approx(200.0)
    assert float(summary[1]["hit_rate"]) == pytest.approx(0.6)
    assert summary[0]["errors"] == "1" and summary[0]["prefill"] == "1"
    assert summary[2]["ttft_mean_ms"] == ""  # NaN written as a blank cell


def test_markdown(experiment: dict[str, Any]) -> None:
    md = markdown(experiment)
    assert md.startswith("### chat-caching\n")
    assert "Workload `chat`: sessions 2, turns 4." in md
    assert (
        "| run | requests | errors | TTFT mean ms | TTFT p99 ms | TPOT mean ms "
        "| JCT mean ms | JCT p99 ms | hit % |" in md
    )
    assert "| pd-basic | 4 | 1 | 200.0 | 298.0 |" in md
    assert "| pd-caching-3 | 4 | 0 | 125.0 |" in md and "| 60.0 |" in md
    assert "| all-failed | 2 | 2 | - |" in md
    assert (
        "- caching (PD): pd-caching-3 vs pd-basic — mean TTFT 37.5% lower (paper 58%), "
        "P99 TTFT 33.4% lower, mean JCT 8.3% lower, P99 JCT 0.1% lower" in md
    )


def test_markdown_higher_and_paper_jct() -> None:
    base = run("a", [record(0.1, 0.5)])
    new = run("b", [record(0.2, 0.6)])
    comp = compare({"a": base, "b": new}, "slower", "a", "b", {"jct_mean": 0.17})
    md = markdown(
        {"name": "n", "workload": {"name": "w"}, "runs": [base, new], "comparisons": [comp]}
    )
    assert "mean TTFT 100.0% higher" in md
    assert "mean JCT 20.0% higher (paper 17%)" in md
    assert "Workload `w`." in md


def test_write_all_files(experiment: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "results" / "nested"
    paths = write_all(experiment, out)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        [
            "chat-caching.json",
            "chat-caching.csv",
            "chat-caching-summary.csv",
            "chat-caching.md",
            "chat-caching-ttft-cdf.png",
            "chat-caching-bars.png",
        ]
    )
    for p in paths:
        assert p.parent == out and p.stat().st_size > 0
    data = json.loads((out / "chat-caching.json").read_text())
    assert data["runs"][2]["summary"]["ttft"]["mean_ms"] is None  # NaN -> null
    # The document read back from JSON (nulls for NaN) renders the same markdown.
    assert markdown(data) == (out / "chat-caching.md").read_text()
    with (out / "chat-caching.csv").open() as f:
        assert sum(1 for _ in f) == 1 + 10  # header + every record
    for png in ("chat-caching-ttft-cdf.png", "chat-caching-bars.png"):
        blob = (out / png).read_bytes()
        assert blob.startswith(PNG_SIGNATURE) and len(blob) > 5_000


def test_write_all_without_plots(experiment: dict[str, Any], tmp_path: Path) -> None:
    paths = write_all(experiment, tmp_path, plots=False)
    assert len(paths) == 4 and not list(tmp_path.glob("*.png"))


def test_write_all_without_matplotlib(
    experiment: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    import sys

    import bench

    # None in sys.modules makes `import matplotlib` raise ImportError, as if not installed;
    # bench.plots is dropped so that write_all imports it afresh (and fails).
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "bench.plots", raising=False)
    monkeypatch.delattr(bench, "plots", raising=False)
    paths = write_all(experiment, tmp_path)
    assert len(paths) == 4 and not list(tmp_path.glob("*.png"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning: no plots" in err


def test_plots_with_empty_runs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from bench.plots import plot_bars, plot_ttft_cdf

    open_before = len(plt.get_fignums())
    no_records = run("nothing", [], wall_s=0.0)
    failed = run("failed", FAILED_RECORDS)
    for runs in ([no_records, failed], []):
        exp = {"name": "empty", "workload": {"name": "chat"}, "runs": runs}
        for plot, name in ((plot_ttft_cdf, "cdf.png"), (plot_bars, "bars.png")):
            path = plot(exp, tmp_path / name)
            assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert len(plt.get_fignums()) == open_before  # every figure closed


def test_cdf_log_axis_for_wide_range(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.plots import plot_ttft_cdf, ttft_ms, wants_log_axis

    wide = run("wide", [record(0.001, 0.5), record(0.5, 1.0), record(0.2, 0.3, error="x")])
    assert ttft_ms(wide) == pytest.approx([1.0, 500.0])
    assert wants_log_axis([1.0, 500.0]) and not wants_log_axis([10.0, 150.0])
    assert not wants_log_axis([])
    exp = {"name": "wide", "workload": {"name": "chat"}, "runs": [wide]}
    assert plot_ttft_cdf(exp, tmp_path / "w.png").stat().st_size > 5_000
