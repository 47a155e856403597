"""The scheduler service in-process on real sockets, with a fake clock for expiry: the
fixture the scheduler's service tests share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from common.protocol import scheduler as sp
from common.protocol.admin import AdminReply, AdminRequest
from common.sockets import PushSocket, RpcClient, SubSocket
from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService

TOKEN = "test-token"
# How long a subscriber may take to be connected before anything is published (ZeroMQ's
# slow joiner): published messages before that are dropped by design.
SUBSCRIBE_SETTLE_S = 0.2


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def until(pred: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Harness:
    svc: SchedulerService
    clock: FakeClock
    beats: PushSocket[sp.Heartbeat]
    rpc: RpcClient[Any, Any]
    admin: RpcClient[AdminRequest, AdminReply]
    events: SubSocket[Any]
    serving: asyncio.Task[None]

    async def beat(self, hb: sp.Heartbeat) -> None:
        await self.beats.send(hb)

    async def register(self, hb: sp.Heartbeat) -> None:
        await self.beat(hb)
        await until(lambda: self.svc.core.registry.get(hb.instance_id) is not None, hb.instance_id)

    async def next_event(self) -> Any:
        _, event = await asyncio.wait_for(self.events.recv(), 10)
        return event

    async def call_admin(self, command: str, *args: str, token: str = TOKEN) -> AdminReply:
        return await self.admin.call(AdminRequest(token, command, list(args)), timeout_s=10)


@contextlib.asynccontextmanager
async def running(cfg: SchedulerConfig, clock: FakeClock) -> AsyncIterator[Harness]:
    """A scheduler service on `cfg` and `clock`, with a client on each of its sockets."""
    svc = SchedulerService(cfg, clock=clock, call_timeout_s=0.3)
    serving = asyncio.create_task(svc.serve())
    h = Harness(
        svc,
        clock,
        PushSocket(svc.heartbeat_address, sp.Heartbeat, bind=False),
        RpcClient(svc.address, sp.SchedulerRequest, sp.SchedulerReply),
        RpcClient(svc.admin_address, AdminRequest, AdminReply),
        SubSocket(svc.events_address, sp.InstanceEvent, bind=False, topics=[sp.INSTANCE_TOPIC]),
        serving,
    )
    await asyncio.sleep(SUBSCRIBE_SETTLE_S)
    try:
        yield h
    finally:
        for sock in (h.beats, h.rpc, h.admin, h.events):
            sock.close()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        await svc.close()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    # Expiry follows the fake clock; the real ticker runs every 50 ms.
    cfg = SchedulerConfig(admin_token=TOKEN, heartbeat_timeout_s=0.2).validate()
    async with running(cfg, FakeClock()) as h:
        yield h
