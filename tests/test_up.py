"""`memserve up` as a user runs it: the real command with deploy/local.toml (ports and run
directory moved out of the way by environment overrides, as the file's header says), which
starts every process, prints where to connect, serves a request, and on SIGTERM stops
every process it started and exits 0; a launcher killed with SIGKILL leaves no process
behind; a bad config is one error line and exit 1."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import sys
from asyncio.subprocess import Process
from pathlib import Path
from typing import Any

import pytest

from common.client import GatewayClient
from common.kv_geometry import KVGeometry
from common.sampling import SamplingParams
from tests.procs import children_of, gone

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


async def memserve_up(config: Path, **kw: Any) -> Process:
    return await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "services.cli", "up", "--config", str(config)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        **kw,
    )


async def start_up(tmp_path: Path, mode: str) -> tuple[Process, str, list[int]]:
    """`memserve up` until it prints where to connect: the process, what it printed, and
    the processes it started."""
    env = {
        **os.environ,
        "MEMSERVE_CLUSTER__MODE": mode,
        "MEMSERVE_CLUSTER__RUN_DIR": str(tmp_path / "run"),
        "MEMSERVE_CLUSTER__ADMIN_TOKEN": "up-token",
        "MEMSERVE_GATEWAY__ADDRESS": "tcp://127.0.0.1:0",
        "MEMSERVE_SCHEDULER__ADMIN_ADDRESS": "tcp://127.0.0.1:0",
        "MEMSERVE_API__ADDRESS": "http://127.0.0.1:0",
        "MEMSERVE_MEMPOOL__DEVICE_MEMORY_BYTES": str(8 << 20),
    }
    proc = await memserve_up(ROOT / "deploy" / "local.toml", env=env, cwd=tmp_path)
    assert proc.stdout is not None and proc.stderr is not None
    lines: list[str] = []
    while not any(line.lstrip().startswith("logs") for line in lines):
        line = (await asyncio.wait_for(proc.stdout.readline(), 90)).decode()
        if not line:
            raise AssertionError(f"up exited early: {(await proc.stderr.read()).decode()}")
        lines.append(line)
    return proc, "".join(lines), children_of(proc.pid)


async def stopped(proc: Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        await asyncio.wait_for(proc.communicate(), 60)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
async def test_up_serves_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    proc, text, spawned = await start_up(tmp_path, "pd-caching-3")
    try:
        assert "memserve cluster up: mode pd-caching-3" in text
        # The admin token is never printed: it is in the 0600 state file clients read.
        assert "up-token" not in text
        state = tmp_path / "run" / "cluster.json"
        assert stat.S_IMODE(state.stat().st_mode) == 0o600
        assert json.loads(state.read_text())["admin_token"] == "up-token"
        status = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "services.cli", "admin", "--json", "status"),
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "MEMSERVE_RUN_DIR": str(tmp_path / "run")},
            cwd=tmp_path,
        )
        out, _ = await asyncio.wait_for(status.communicate(), 60)
        assert status.returncode == 0 and "prefill-0" in out.decode()  # found without flags
        block_bytes = KVGeometry.for_model_name("tiny", 16, "float32").block_bytes
        assert f"kv        {(8 << 20) // block_bytes} blocks of 16 tokens per instance" in text
        m = re.search(r"gateway\s+(tcp://\S+)", text)
        assert m is not None, text
        # scheduler, gateway, api, one prefill and one decode worker, a daemon for each worker
        assert len(spawned) == 7, text
        assert re.search(r"http\s+http://127\.0\.0\.1:\d+\s+\(OpenAI API", text), text
        scrape = tmp_path / "run" / "prometheus.yml"
        assert f"metrics   7 targets, scrape config {scrape}" in text  # the api's /metrics too
        assert scrape.read_text().count("- targets: [") == 7

        async with GatewayClient(m.group(1), timeout_s=30) as client:
            done = await client.complete("Hello", SamplingParams(max_tokens=6, ignore_eos=True))
        assert done.final.num_output_tokens == 6
        assert done.final.instances == ["prefill-0", "decode-0"]

        proc.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0
        assert "memserve cluster stopped" in out.decode()
        assert all(gone(pid) for pid in spawned)
        assert not state.exists()
    finally:
        await stopped(proc)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
async def test_a_killed_launcher_leaves_no_process_behind(tmp_path: Path) -> None:
    proc, text, spawned = await start_up(tmp_path, "colocated")
    assert len(spawned) == 5, text  # scheduler, gateway, api, a worker and its daemon
    proc.kill()  # no chance to stop them: they notice they were orphaned, and stop
    await proc.wait()
    # A generous bound (two test workers share 2 cores): the check is that nothing stays.
    for _ in range(600):
        if all(gone(pid) for pid in spawned):
            break
        await asyncio.sleep(0.1)
    assert all(gone(pid) for pid in spawned), [pid for pid in spawned if not gone(pid)]


async def test_up_bad_config_is_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[cluster]\nmode = "pd-caching-9"\n')
    proc = await memserve_up(bad)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert "pd-caching-9" in err.decode() and "Traceback" not in err.decode()
    assert out == b""
