"""`memserve bench serve` as a user runs it (a subprocess, real clusters of the tiny model):

- a tiny experiment (two modes, a few requests) writes JSON, CSV, markdown and PNGs, with
  the caching comparison in them;
- an unknown workload or mode, a missing trace file, a malformed --set: one clear error
  line, no cluster started (run in this process: nothing of a process is at stake);
- a cluster that fails to start: the error names the cause, and what was measured is
  written;
- Ctrl-C mid-run: what was measured is written, every process it started is stopped.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import pytest

from tests.bench.serve_cli import assert_one_clear_error, bench, finished
from tests.procs import children_of, gone

pytestmark = pytest.mark.integration

TINY = ["--model", "tiny", "--colocated", "1", "--warmup", "1", "--no-progress"]


async def test_a_tiny_experiment_writes_every_format(tmp_path: Path) -> None:
    out_dir = tmp_path / "results"
    proc = await bench(
        *("--workload", "chat", "--modes", "colocated-nocache,colocated", *TINY),
        *("--sessions", "2", "--rate", "0", "--scale", "0.1", "--out-dir", str(out_dir)),
        cwd=tmp_path,
    )
    out, err = await finished(proc, 240)
    assert proc.returncode == 0, err
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == [
        "chat-bars.png",
        "chat-summary.csv",
        "chat-ttft-cdf.png",
        "chat.csv",
        "chat.json",
        "chat.md",
    ]
    doc = json.loads((out_dir / "chat.json").read_text())
    runs = {r["label"]: r for r in doc["runs"]}
    assert list(runs) == ["colocated-nocache", "colocated"]
    requests = doc["workload"]["summary"]["requests"]
    for r in runs.values():
        assert r["summary"]["requests"] == requests and r["summary"]["errors"] == 0
    # Later turns carry their history: with caching they hit, without they never do.
    assert runs["colocated"]["summary"]["hit_rate"] > 0
    assert runs["colocated-nocache"]["summary"]["hit_rate"] == 0
    assert [c["name"] for c in doc["comparisons"]] == ["caching (colocated)"]
    assert doc["comparisons"][0]["paper"]["ttft_mean"] == 0.58
    csv_rows = (out_dir / "chat.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 2 * requests
    md = (out_dir / "chat.md").read_text()
    assert "| colocated |" in md and "caching (colocated): colocated vs colocated-nocache" in md
    for png in ("chat-bars.png", "chat-ttft-cdf.png"):
        assert (out_dir / png).read_bytes()[:4] == b"\x89PNG"
    assert "caching (colocated)" in out and "saved" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workload", "poems"], "unknown workload 'poems'"),
        (["--modes", "pd-caching-9"], "unknown mode 'pd-caching-9'"),
        (["--policies", "nearest"], "unknown policy 'nearest'"),
        (["--workload", "sharegpt", "--trace", "missing.json"], "missing.json"),
        (["--workload", "chat", "--set", "turns_mean"], "expected KEY=VALUE"),
        (["--workload", "chat", "--set", "colour=3"], "unknown override 'colour'"),
    ],
)
def test_bad_input_is_one_clear_error(
    tmp_path: Path,
    args: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In process: the exit code through a real process is shown by the failed-start test.
    assert_one_clear_error(args, message, tmp_path, monkeypatch, capsys)


async def test_a_cluster_that_fails_to_start_is_reported(tmp_path: Path) -> None:
    proc = await bench(
        *("--modes", "colocated", "--sessions", "1", *TINY),
        *("--model", str(tmp_path / "no-model"), "--out-dir", str(tmp_path / "r")),
        cwd=tmp_path,
    )
    _, err = await finished(proc, 120)
    assert proc.returncode == 1
    assert "the cluster did not start" in err and "no-model" in err
    doc = json.loads((tmp_path / "r" / "chat.json").read_text())
    assert "did not start" in doc["error"] and doc["runs"] == []


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
async def test_ctrl_c_keeps_what_was_measured_and_stops_every_process(tmp_path: Path) -> None:
    out_dir = tmp_path / "r"
    proc = await bench(
        *("--modes", "colocated,colocated-nocache", *TINY, "--out-dir", str(out_dir)),
        *("--sessions", "8", "--rate", "0", "--scale", "2", "--set", "turns_mean=8"),
        cwd=tmp_path,
    )
    assert proc.stdout is not None
    while b"starting a cluster" not in await asyncio.wait_for(proc.stdout.readline(), 60):
        pass
    spawned: list[int] = []
    for _ in range(300):  # the cluster is up and the replay has begun
        spawned = children_of(proc.pid)
        if len(spawned) == 4 and any(out_dir.parent.glob(".memserve/bench/colocated/*.log")):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(6)
    proc.send_signal(signal.SIGINT)
    _, err = await finished(proc, 90)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert all(gone(pid) for pid in spawned)
    doc = json.loads((out_dir / "chat.json").read_text())
    assert doc["interrupted"] and [r["label"] for r in doc["runs"]] == ["colocated"]
    run = doc["runs"][0]
    assert run["interrupted"] and run["unsent"] > 0
    assert len(run["records"]) + run["unsent"] == doc["workload"]["summary"]["requests"]
