"""A gateway process killed with SIGKILL under its clients (stand-in scheduler and worker
in the test): a stream waiting on it fails with `GatewayGone` within a few heartbeats,
not its own timeout (set far above); a request that already streamed a token is never
retried; one that had not is retried and served by the gateway restarted on the same
address."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest

from common.client import GatewayClient, GatewayGone
from common.protocol import worker as wp
from common.sampling import SamplingParams
from tests.daemons import Launcher, Proc
from tests.gateway.harness import TOKEN, FakeScheduler, FakeWorker, ids

pytestmark = pytest.mark.integration

TIMEOUT_S = 600.0  # the client's own timeout: never what ends these tests' waits
PARAMS = SamplingParams(max_tokens=8)


@pytest.fixture
async def stand_ins() -> AsyncIterator[tuple[FakeScheduler, FakeWorker]]:
    sched, worker = FakeScheduler(), FakeWorker("w0")
    sched.colocated(worker)
    yield sched, worker
    worker.close()
    await sched.close()


async def start_gateway(
    launcher: Launcher, sched: FakeScheduler, address: str, instance_id: str = "gw0"
) -> Proc:
    # A restart gets its own id here only so that the launcher waits for its readiness
    # (and keeps its log apart); a gateway's clients never see its id.
    return await launcher.start(
        "gateway",
        instance_id,
        {
            "address": address,
            "scheduler": sched.rpc.address,
            "scheduler_events": sched.pub.address,
            "admin_token": TOKEN,
            "request_timeout_s": 600,
        },
    )


async def kill(gw: Proc) -> float:
    gw.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(gw.proc.wait, 10)
    return time.monotonic()


async def test_a_killed_gateway_fails_a_streamed_request_with_gateway_gone(
    stand_ins: tuple[FakeScheduler, FakeWorker], launcher: Launcher
) -> None:
    sched, worker = stand_ins
    gw = await start_gateway(launcher, sched, "tcp://127.0.0.1:0")
    client = GatewayClient(gw.endpoints["clients"], timeout_s=TIMEOUT_S, heartbeat_s=0.5, retries=3)
    try:
        stream = client.generate([5, 6, 7], PARAMS)
        first = asyncio.create_task(stream.__anext__())
        gen = await worker.recv()
        assert isinstance(gen, wp.Generate)
        await worker.send(gen.reply_to, wp.TokenChunk(gen.request_id, ids("a"), instance_id="w0"))
        assert await first == "a"
        rest = asyncio.create_task(stream.__anext__())
        killed_at = await kill(gw)
        with pytest.raises(GatewayGone, match="stopped answering.*not retried") as err:
            await rest
        print(f"GatewayGone {time.monotonic() - killed_at:.2f} s after SIGKILL: {err.value}")
        assert err.value.streamed == 1
    finally:
        client.close()


async def test_a_request_before_its_first_token_is_retried_on_the_restarted_gateway(
    stand_ins: tuple[FakeScheduler, FakeWorker], launcher: Launcher
) -> None:
    sched, worker = stand_ins
    gw = await start_gateway(launcher, sched, "tcp://127.0.0.1:0")
    address = gw.endpoints["clients"]
    # Retries enough to outlast the restart (each waits HEARTBEAT_MISSES beats).
    client = GatewayClient(address, timeout_s=TIMEOUT_S, heartbeat_s=0.5, retries=20)
    try:
        done = asyncio.create_task(client.complete([5, 6, 7], PARAMS, request_id="q"))
        lost = await worker.recv()
        assert isinstance(lost, wp.Generate)
        killed_at = await kill(gw)
        again = await start_gateway(launcher, sched, address, "gw0-again")  # its supervisor
        assert again.endpoints["clients"] == address
        print(f"restarted on {address} {time.monotonic() - killed_at:.2f} s after SIGKILL")
        while not done.done():  # the retry reaches the new gateway, which places it afresh
            if not await worker.requests.poll(0.1):
                continue
            gen = await worker.recv()
            if isinstance(gen, wp.Generate) and gen.request_id != lost.request_id:
                chunk = wp.TokenChunk(
                    gen.request_id, ids("ok"), finished=True, finish_reason="stop", instance_id="w0"
                )
                await worker.send(gen.reply_to, chunk)
        out = await done
        print(f"served after the restart, {time.monotonic() - killed_at:.2f} s after SIGKILL")
        assert (out.text, out.final.finish_reason) == ("ok", "stop")
        assert out.final.request_id.startswith("q~")  # a retry, under a fresh id
    finally:
        client.close()
