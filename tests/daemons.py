"""Fixture: start real MemPool daemons in their own processes, configured through the environment
(MEMSERVE_MEMPOOL__*), and wait for their readiness handshake."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

from common.mempool_client import MempoolClient
from common.ready import ReadyWaiter


@dataclass
class Daemon:
    instance_id: str
    proc: subprocess.Popen[bytes]
    endpoints: dict[str, str]
    client: MempoolClient

    @property
    def address(self) -> str:
        return self.endpoints["rpc"]


SpawnDaemon = Callable[..., Coroutine[Any, Any, Daemon]]


def _env_value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f'"{v}"' for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.fixture
async def spawn_daemon() -> AsyncIterator[SpawnDaemon]:
    daemons: list[Daemon] = []
    waiter = ReadyWaiter()

    async def spawn(instance_id: str, **settings: object) -> Daemon:
        env = dict(os.environ)
        env["MEMSERVE_MEMPOOL__INSTANCE_ID"] = instance_id
        env.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        for key, value in {"device_blocks": 64, **settings}.items():
            env[f"MEMSERVE_MEMPOOL__{key.upper()}"] = _env_value(value)
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "mempool", "--ready", waiter.address],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            ready = await waiter.wait(
                [instance_id], timeout_s=60, alive=lambda: {instance_id: proc.poll() is None}
            )
        except Exception:
            proc.kill()
            raise
        d = Daemon(
            instance_id,
            proc,
            ready[instance_id].endpoints,
            MempoolClient(ready[instance_id].endpoints["rpc"]),
        )
        daemons.append(d)
        return d

    yield spawn
    for d in daemons:
        d.client.close()
        if d.proc.poll() is None:
            d.proc.terminate()
    for d in daemons:
        try:
            await asyncio.to_thread(d.proc.wait, 10)
        except subprocess.TimeoutExpired:
            d.proc.kill()
    waiter.close()
