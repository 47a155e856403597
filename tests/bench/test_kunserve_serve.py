"""`memserve bench serve` with KunServe's modes as a user runs it (in this process, real
clusters of the tiny model, 2 colocated instances with a small budget each):

- a small spike through dp-recompute and kunserve writes every format, the timeline and
  P99 plots included; the kunserve run's controller dropped into a group by itself and
  its timeline says when;
- an unknown mode, a budget below the parameters, a spike that does not parse: one clear
  error naming it, no cluster started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import build_parser
from tests.bench.serve_cli import assert_one_clear_error

pytestmark = pytest.mark.integration

# tiny: 3.1 MiB of parameters, 3 MiB of KV each (96 blocks of 16 tokens); 14 requests of
# ~120 + 200 tokens at once fill both and queue, so the controller drops.
SPIKE = [
    *("--model", "tiny", "--workload", "reasoning", "--sessions", "16", "--rate", "0.5"),
    *("--arrival", "spike:14:0.3:0.5", "--set", "question_tokens_mean=120"),
    *("--output-len", "200", "--scale", "1", "--budget-mib", "6.1"),
    *("--policies", "round-robin", "--warmup", "0", "--no-progress", "--timeout", "60"),
    *("--cluster-set", "scheduler.elastic_window=5", "--cluster-set", "worker.stage_timeout_s=3"),
    *("--cluster-set", "scheduler.elastic_cooldown_s=1", "--cluster-set", "scheduler.elastic_min_group_s=1"),
]  # fmt: skip


def test_a_small_spike_writes_every_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process (test_serve.py runs the command as a subprocess): one interpreter start
    # less on CI's 2 cores.
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "results"
    argv = [*SPIKE, "--modes", "dp-recompute,kunserve", "--out-dir", str(out_dir)]
    args = build_parser().parse_args(["bench", "serve", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    stem = "reasoning"
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted(
        f"{stem}{suffix}"
        for suffix in (
            ".json",
            ".csv",
            "-summary.csv",
            ".md",
            "-ttft-cdf.png",
            "-bars.png",
            "-timeline.png",
            "-p99.png",
        )
    )
    doc = json.loads((out_dir / f"{stem}.json").read_text())
    runs = {r["label"]: r for r in doc["runs"]}
    assert list(runs) == ["dp-recompute", "kunserve"]
    for r in runs.values():
        assert r["summary"]["errors"] == 0 and r["summary"]["requests"] == 16
        assert r["summary"]["ttft"]["p999_ms"] > 0
        assert r["budget_bytes"] == int(6.1 * (1 << 20))
    base, kun = runs["dp-recompute"]["elastic"], runs["kunserve"]["elastic"]
    assert base["controller"]["on"] is False and base["drops"] == 0
    assert kun["controller"] == {
        "on": True,
        "strategy": "kunserve",
        "exchange": True,
        "restore": True,
    }
    assert kun["drops"] >= 1, kun["timeline"]
    group = kun["groups"][0]
    assert 0 < group["prepare_s"] < group["serving_s"] and group["lifetime_s"] > 0
    names = [e["event"] for e in kun["timeline"]]
    assert names.index("votes") < names.index("prepare") < names.index("serving")
    (ratio,) = doc["kunserve"]["ratios"]
    assert ratio["base"] == "dp-recompute" and ratio["paper"] == [12.7, 72.2]
    md = (out_dir / f"{stem}.md").read_text()
    assert "#### reasoning: KunServe modes" in md and "(paper 12.7-72.2x lower)" in md
    csv_rows = (out_dir / f"{stem}.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 2 * 16
    for png in ("-timeline.png", "-p99.png", "-ttft-cdf.png"):
        assert (out_dir / f"{stem}{png}").read_bytes()[:4] == b"\x89PNG"
    assert "budget per instance 6.1 MiB" in out and "KunServe vs vLLM (recompute)" in out


BAD = [
    (["--modes", "kunserve-9"], "unknown mode 'kunserve-9'"),
    (["--modes", "kunserve", "--budget-mib", "2"], "--budget-mib 2: model tiny's parameters"),
    (["--modes", "kunserve", "--arrival", "spike:x:1:1"], "N 'x' is not a number"),
    (["--modes", "colocated", "--budget-mib", "8"], "--budget-mib is for the KunServe modes"),
]


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_input_is_one_clear_error(
    tmp_path: Path,
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tiny = ["--model", "tiny", "--workload", "reasoning"]
    assert_one_clear_error([*tiny, *args], message, tmp_path, monkeypatch, capsys)
