"""A worker outlives its MemPool daemon: the daemon is killed (SIGKILL) and started again
on the same address, and the same worker process notices the new incarnation, fails what
was in flight, re-attaches, says it is healthy again and serves the reference tokens on
the new daemon, which passes its integrity check. A worker whose daemon is dead still
stops promptly on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from common.admin_client import admin_call
from common.mempool_client import MempoolClient
from common.sampling import SamplingParams
from tests.daemons import Launcher, SpawnDaemon, SpawnWorker
from tests.worker.helpers import Gateway, prompt, tokens

pytestmark = pytest.mark.integration

TOKEN = "restart-token"


async def worker_status(control: str) -> dict[str, object]:
    reply = await admin_call(control, TOKEN, "status", timeout_s=2.0)
    assert reply.ok, reply.error
    return dict(reply.result)


async def test_worker_reattaches_to_a_restarted_daemon(
    tmp_path: Path, spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker
) -> None:
    daemon = await spawn_daemon("m0", device_blocks=128)
    worker = await spawn_worker("w0", daemon.address, admin_token=TOKEN, heartbeat_interval_s=0.2)
    control = worker.endpoints["control"]
    gw = Gateway(worker.endpoints["requests"])
    relauncher = Launcher(tmp_path / "restart")
    (tmp_path / "restart").mkdir()
    client: MempoolClient | None = None
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    p = prompt(40, 3)
    try:
        await gw.generate("before", p, params)
        before = tokens((await gw.collect({"before"}))["before"])
        # A long request in flight when the daemon dies.
        long = SamplingParams(max_tokens=400, ignore_eos=True)
        await gw.generate("long", prompt(30, 5), long)
        first = await asyncio.wait_for(gw.replies.recv(), 30)
        assert first.request_id == "long"
        gw.streams.setdefault("long", []).append(first)
        daemon.proc.kill()
        await asyncio.to_thread(daemon.proc.wait)
        killed = time.monotonic()
        again = await relauncher.start(
            "mempool",
            "m0",
            {
                "device_blocks": 128,
                "control_address": daemon.address,
                "events_address": daemon.endpoints["events"],
            },
        )
        assert again.endpoints["rpc"] == daemon.address
        client = MempoolClient(again.endpoints["rpc"])
        # The request in flight ends: done before the restart was seen, or failed.
        end = (await gw.collect({"long"}))["long"][-1]
        assert end.finished
        if end.error:
            assert "restarted" in end.error or "lost" in end.error, end.error
        # The same worker process becomes healthy on the new daemon.
        deadline = time.monotonic() + 20
        while True:
            st = await worker_status(control)
            if st["healthy"] and st["mempool_reattaches"] == 1:
                break
            assert time.monotonic() < deadline, st
            await asyncio.sleep(0.05)
        healthy = time.monotonic()
        assert worker.proc.poll() is None
        await gw.generate("after", p, params)
        after = tokens((await gw.collect({"after"}))["after"])
        served = time.monotonic()
        assert after == before
        print(
            f"\ndaemon restart: in-flight request ended with "
            f"{end.finish_reason!r} ({end.error or 'no error'}); worker healthy "
            f"{healthy - killed:.2f} s after the kill, serving {served - killed:.2f} s after"
        )
        check = await client.check_integrity()
        assert check.ok, check.message
    finally:
        gw.close()
    # SIGTERM: the worker gives its lease back to the new daemon and exits 0.
    worker.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, 20) == 0
    assert client is not None
    stats = await client.stats()
    assert stats.client["device"] == 0 and stats.pinned["device"] == 0, stats
    assert (await client.check_integrity()).ok
    client.close()
    await relauncher.stop_all()


async def test_worker_with_a_dead_daemon_stops_promptly(
    spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker
) -> None:
    daemon = await spawn_daemon("m1")
    worker = await spawn_worker("w1", daemon.address)
    gw = Gateway(worker.endpoints["requests"])
    try:  # the worker holds a lease (blocks it computed in) when the daemon goes
        await gw.generate("r", prompt(20, 1), SamplingParams(max_tokens=4, ignore_eos=True))
        await gw.collect({"r"})
    finally:
        gw.close()
    daemon.proc.kill()
    await asyncio.to_thread(daemon.proc.wait)
    t0 = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, 20) == 0
    print(f"\nworker with a dead daemon stopped {time.monotonic() - t0:.2f} s after SIGTERM")
