"""Fixtures of the gateway tests: a stand-in scheduler (`sched`), a stand-in colocated
worker it places everything on (`worker`), and a real colocated instance (`cluster`): a
MemPool daemon and a worker process on it, with a stand-in scheduler placing there."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

from tests.daemons import Daemon, Proc, SpawnDaemon, SpawnWorker
from tests.gateway.harness import FakeScheduler, FakeWorker


@pytest.fixture
async def sched() -> AsyncIterator[FakeScheduler]:
    s = FakeScheduler()
    yield s
    await s.close()


@pytest.fixture
async def worker(sched: FakeScheduler) -> AsyncIterator[FakeWorker]:
    w = FakeWorker("w0")
    sched.colocated(w)
    yield w
    w.close()


@pytest.fixture
async def cluster(
    spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker
) -> AsyncIterator[tuple[FakeScheduler, Daemon, Proc]]:
    daemon = await spawn_daemon("m0", device_blocks=256)
    worker = await spawn_worker("w0", daemon.address, engine__num_threads=1)
    sched = FakeScheduler()
    sched.colocated(worker.endpoints["requests"])
    yield sched, daemon, worker
    await sched.close()
    # The worker first: it gives its leased blocks back while its daemon is still there.
    worker.proc.send_signal(signal.SIGTERM)
    await asyncio.to_thread(worker.proc.wait, 20)
