"""`memserve bench http` as a user runs it, on a tiny budget: one local cluster, both
paths measured, the JSON file holds every figure (no timing is judged here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_run_writes_its_figures(tmp_path: Path) -> None:
    out_dir = tmp_path / "results"
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "services.cli", "bench", "http"),
            *(
                "--requests",
                "6",
                "--clients",
                "2",
                "--duration-s",
                "0.5",
                "--out-dir",
                str(out_dir),
            ),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "added by HTTP" in proc.stdout
    result = json.loads((out_dir / "bench_http.json").read_text())
    lat = result["latency_one_token"]
    assert lat["requests"] == 6
    for path in ("http", "zmq"):
        assert lat[path]["p50_ms"] > 0 and lat[path]["p99_ms"] >= lat[path]["p50_ms"]
        assert result["rate"][path]["requests"] > 0
        assert result["rate"][path]["requests_per_s"] > 0
    assert {"added_p50_ms", "added_p99_ms"} <= set(lat)
    assert result["rate"]["clients"] == 2 and "machine" in result
