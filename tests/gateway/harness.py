"""Stand-ins for the gateway's peers, on real sockets: a scheduler (Place / Release RPC and
the instance-event PUB) and scripted workers (a PULL for Generate / Abort, a PUSH of token
chunks to the gateway), plus an in-process gateway."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from common.admin_client import admin_call
from common.errors import InvalidRequestError
from common.protocol import scheduler as sp
from common.protocol import worker as wp
from common.protocol.admin import AdminReply
from common.sampling import SamplingParams
from common.sockets import PubSocket, PullSocket, PushSocket, RpcServer
from common.tokenizer import Tokenizer, build_byte_tokenizer
from services.gateway.config import GatewayConfig
from services.gateway.service import GatewayService, build
from services.worker.config import EngineConfig
from services.worker.engine import Engine
from tests.daemons import Daemon, assert_idle_and_intact

TOKEN = "test-token"
TOK = Tokenizer(build_byte_tokenizer())


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_special_tokens=False)


class FakeScheduler:
    """Answers `Place` with `route(place)` (or an error, or never), records every call,
    and publishes instance events."""

    def __init__(self) -> None:
        self.rpc = RpcServer("tcp://127.0.0.1:0", sp.SchedulerRequest, sp.SchedulerReply)
        self.pub = PubSocket("tcp://127.0.0.1:0", sp.InstanceEvent, bind=True)
        self.route: Callable[[sp.Place], sp.Placement] | None = None
        self.error = ""  # non-empty: Place is refused with this message
        self.hang = False  # True: Place is never answered
        self.places: list[sp.Place] = []
        self.releases: list[sp.Release] = []
        self.alive: list[sp.GatewayAlive] = []
        self._task = asyncio.create_task(self.rpc.serve(self._handle))

    def colocated(self, worker: FakeWorker | str, instance_id: str = "w0") -> None:
        address = worker if isinstance(worker, str) else worker.address
        self.route = lambda p: sp.Placement(
            p.request_id, instance_id, address=address, mode="colocated", policy="test"
        )

    def pd(self, prefill: FakeWorker, decode: FakeWorker) -> None:
        handoff = wp.HandOff(
            "decode-0",
            address=decode.address,
            mempool="tcp://127.0.0.1:9",
            insert=True,
            cache=True,
            return_kv=True,
        )
        self.route = lambda p: sp.Placement(
            p.request_id,
            "prefill-0",
            address=prefill.address,
            mode="pd-caching-3",
            policy="test",
            handoff=handoff,
        )

    async def _handle(self, req: Any) -> Any:
        if isinstance(req, sp.GatewayAlive):
            self.alive.append(req)
            return sp.GatewayKnown()
        if isinstance(req, sp.Release):
            self.releases.append(req)
            return sp.Released(True)
        self.places.append(req)
        if self.hang:
            await asyncio.sleep(3600)
        if self.error:
            raise InvalidRequestError(self.error)
        assert self.route is not None, "the test set no route"
        return self.route(req)

    async def publish(self, event: Any) -> None:
        await self.pub.publish(sp.INSTANCE_TOPIC, event)

    async def released(self, rid: str, n: int = 1, timeout_s: float = 10) -> list[str]:
        """The phases released for `rid`, once there are `n` of them."""
        deadline = time.monotonic() + timeout_s
        while True:
            phases = sorted(r.phase for r in self.releases if r.request_id == rid)
            if len(phases) >= n or time.monotonic() > deadline:
                return phases
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.rpc.close()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.pub.close()


class FakeWorker:
    """A worker played by the test: it receives what the gateway sends and pushes the
    token chunks the test chooses."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.requests = PullSocket("tcp://127.0.0.1:0", wp.WorkerRequest, bind=True)
        self.address = self.requests.address
        self._out: PushSocket[wp.TokenChunk] | None = None

    async def recv(self, timeout_s: float = 10) -> Any:
        return await asyncio.wait_for(self.requests.recv(), timeout_s)

    async def quiet(self, seconds: float) -> bool:
        """Whether nothing arrives for `seconds`."""
        return not await self.requests.poll(seconds)

    async def send(self, reply_to: str, chunk: wp.TokenChunk) -> None:
        if self._out is None:
            self._out = PushSocket(reply_to, wp.TokenChunk, bind=False)
        await self._out.send(chunk)

    def close(self) -> None:
        self.requests.close()
        if self._out is not None:
            self._out.close()


@contextlib.asynccontextmanager
async def running_gateway(
    scheduler: FakeScheduler, **overrides: Any
) -> AsyncIterator[tuple[GatewayService, asyncio.Task[None]]]:
    cfg = GatewayConfig(
        scheduler=scheduler.rpc.address,
        scheduler_events=scheduler.pub.address,
        admin_token=TOKEN,
        **overrides,
    ).validate()
    gw = build(cfg)
    task = asyncio.create_task(gw.serve())
    try:
        yield gw, task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await gw.close()


async def admin(address: str, command: str, token: str = TOKEN) -> AdminReply:
    return await admin_call(address, token, command)


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float = 20) -> bool:
    """Poll `check` until it holds (True) or the time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def reference(prompt: list[int], max_tokens: int) -> list[int]:
    """The greedy tokens of the single-process engine."""
    engine = Engine.from_config(EngineConfig(model="tiny", num_kv_blocks=64))
    engine.add_request("r", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    out: list[int] = []
    while engine.has_unfinished():
        for o in engine.step():
            out.extend(o.new_token_ids)
    engine.check_integrity()
    return out


async def idle_and_intact(daemon: Daemon) -> None:
    """The worker gave back every pin it took for requests, and no block leaked."""
    await assert_idle_and_intact(daemon.client, daemon.instance_id)
