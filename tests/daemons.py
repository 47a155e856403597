"""Fixtures: start real service processes (MemPool daemons, workers), configured through
the environment (MEMSERVE_<TABLE>__<KEY>), and wait for their readiness handshake. Each
process's stderr (its JSON log) goes to a file in the test's temp folder."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from common.mempool_client import MempoolClient
from common.ready import ReadyWaiter


@dataclass
class Proc:
    instance_id: str
    proc: subprocess.Popen[bytes]
    endpoints: dict[str, str]
    log: Path


@dataclass
class Daemon(Proc):
    client: MempoolClient

    @property
    def address(self) -> str:
        return self.endpoints["rpc"]


SpawnDaemon = Callable[..., Coroutine[Any, Any, Daemon]]
SpawnWorker = Callable[..., Coroutine[Any, Any, Proc]]


def _env_value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


class Launcher:
    def __init__(self, folder: Path):
        self.folder = folder
        self.waiter = ReadyWaiter()
        self.procs: list[Proc] = []

    async def start(self, service: str, instance_id: str, settings: dict[str, object]) -> Proc:
        env = dict(os.environ)
        env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        table = service.upper()
        env[f"MEMSERVE_{table}__INSTANCE_ID"] = instance_id
        for key, value in settings.items():
            env[f"MEMSERVE_{table}__{key.upper()}"] = _env_value(value)
        log = self.folder / f"{instance_id}.log"
        with log.open("wb") as stderr:
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.cli", service, "--ready", self.waiter.address],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            ready = await self.waiter.wait(
                [instance_id], timeout_s=90, alive=lambda: {instance_id: proc.poll() is None}
            )
        except Exception:
            proc.kill()
            raise RuntimeError(f"{instance_id} did not start:\n{log.read_text()[-3000:]}") from None
        p = Proc(instance_id, proc, ready[instance_id].endpoints, log)
        self.procs.append(p)
        return p

    async def stop_all(self) -> None:
        """Newest first, each gone before the next: a worker stops before its daemon, so it
        gives its leased blocks back instead of waiting out an RPC to a daemon already gone."""
        for p in reversed(self.procs):
            if p.proc.poll() is None:
                p.proc.terminate()
            try:
                await asyncio.to_thread(p.proc.wait, 10)
            except subprocess.TimeoutExpired:
                p.proc.kill()
        self.waiter.close()


@pytest.fixture
async def launcher(tmp_path: Path) -> AsyncIterator[Launcher]:
    lau = Launcher(tmp_path)
    yield lau
    await lau.stop_all()


@pytest.fixture
async def spawn_daemon(launcher: Launcher) -> AsyncIterator[SpawnDaemon]:
    clients: list[MempoolClient] = []

    async def spawn(instance_id: str, **settings: object) -> Daemon:
        p = await launcher.start("mempool", instance_id, {"device_blocks": 64, **settings})
        client = MempoolClient(p.endpoints["rpc"])
        clients.append(client)
        return Daemon(p.instance_id, p.proc, p.endpoints, p.log, client)

    yield spawn
    for c in clients:
        c.close()


@pytest.fixture
async def spawn_worker(launcher: Launcher) -> SpawnWorker:
    async def spawn(instance_id: str, mempool: str, **settings: object) -> Proc:
        return await launcher.start("worker", instance_id, {"mempool": mempool, **settings})

    return spawn


async def assert_idle_and_intact(client: MempoolClient, name: str, timeout_s: float = 20.0) -> None:
    """Within `timeout_s`, background transfers (pd-caching-3's KV sent back) end and
    nothing stays pinned at this daemon; then its `check_integrity` passes: no block leaked."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        st = await client.stats()
        idle = st.pinned["device"] == 0 and st.pending_transfers == 0
        if idle or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert idle, (name, st)
    check = await client.check_integrity()
    assert check.ok, f"{name}: {check.message}"


async def assert_clean(*daemons: Daemon) -> None:
    """Every daemon passes check_integrity with no client blocks and no transfer pending."""
    for d in daemons:
        check = await d.client.check_integrity()
        assert check.ok, f"{d.instance_id}: {check.message}"
        st = await d.client.stats()
        assert st.client["device"] == 0 and st.pending_transfers == 0, (
            f"{d.instance_id} holds blocks: {st}"
        )
