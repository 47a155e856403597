"""Self-healing at the gateway (stand-in scheduler, workers played by the test, except the
last test's real worker): a request whose instance went down before its first token is
placed again elsewhere with no error for its client, avoiding the dead instance; after
its first token it fails naming the instance; the gateway says it is alive to the
scheduler, and a placement the scheduler did not answer is released once it answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from common.client import GatewayClient, GatewayError
from common.protocol import scheduler as sp
from common.protocol import worker as wp
from common.protocol.worker import TokenChunk
from common.sampling import SamplingParams
from tests.daemons import Daemon, Proc
from tests.gateway.harness import (
    FakeScheduler,
    FakeWorker,
    idle_and_intact,
    ids,
    reference,
    running_gateway,
    until,
)

pytestmark = pytest.mark.integration

PARAMS = SamplingParams(max_tokens=8)


@pytest.fixture
async def workers() -> AsyncIterator[tuple[FakeWorker, FakeWorker]]:
    a, b = FakeWorker("w0"), FakeWorker("w1")
    yield a, b
    a.close()
    b.close()


def fail_over(sched: FakeScheduler, first: str, first_id: str, then: str, then_id: str) -> None:
    """Place on `first` unless the gateway asks to avoid it."""
    sched.route = lambda p: sp.Placement(
        p.request_id,
        then_id if first_id in p.avoid else first_id,
        address=then if first_id in p.avoid else first,
        mode="colocated",
        policy="test",
    )


async def down_until(sched: FakeScheduler, iid: str, w: FakeWorker) -> None:
    """Publish InstanceDown(iid) until `w` has a message (the gateway's subscription
    joins at its own pace)."""
    for _ in range(400):
        await sched.publish(sp.InstanceDown(iid, "missed heartbeats"))
        if await w.requests.poll(0.05):
            return
    raise AssertionError(f"nothing reached {w.instance_id}")


async def test_an_instance_down_before_the_first_token_is_placed_again(
    sched: FakeScheduler, workers: tuple[FakeWorker, FakeWorker]
) -> None:
    w0, w1 = workers
    fail_over(sched, w0.address, "w0", w1.address, "w1")
    async with running_gateway(sched, request_timeout_s=600) as (gw, _):
        client = GatewayClient(gw.endpoints["clients"], timeout_s=60)
        try:
            done = asyncio.create_task(client.complete([5, 6, 7], PARAMS))
            gen = await w0.recv()
            await down_until(sched, "w0", w1)
            again = await w1.recv()
            assert isinstance(again, wp.Generate)
            # Under a fresh id: nothing of the old placement can touch the new one.
            assert again.request_id == f"{gen.request_id}.1" and again.token_ids == [5, 6, 7]
            place = sched.places[-1]
            assert place.avoid == ["w0"] and place.gateway == gw.cfg.instance_id
            assert place.gateway_started_at == gw.started_at
            # The dead one's last words are ignored (if they come at all).
            await w0.send(gen.reply_to, TokenChunk(gen.request_id, [], error="x", instance_id="w0"))
            await asyncio.sleep(0.2)
            chunk = TokenChunk(
                again.request_id, ids("hi"), finished=True, finish_reason="stop", instance_id="w1"
            )
            await w1.send(again.reply_to, chunk)
            out = await done
            assert (out.text, out.final.finish_reason, out.final.instances) == (
                "hi",
                "stop",
                ["w1"],
            )
            # Both placements' charges are given back.
            assert await sched.released(gen.request_id) == ["all"]
            assert await sched.released(again.request_id) == ["all"]
        finally:
            client.close()


async def test_after_the_first_token_or_out_of_attempts_the_error_names_the_instance(
    sched: FakeScheduler, workers: tuple[FakeWorker, FakeWorker]
) -> None:
    w0, w1 = workers
    fail_over(sched, w0.address, "w0", w1.address, "w1")
    async with running_gateway(sched, request_timeout_s=600) as (gw, _):
        client = GatewayClient(gw.endpoints["clients"], timeout_s=60)
        try:
            stream = client.generate([5, 6], PARAMS)
            first = asyncio.create_task(stream.__anext__())
            gen = await w0.recv()
            await w0.send(gen.reply_to, TokenChunk(gen.request_id, ids("a"), instance_id="w0"))
            assert await first == "a"
            rest = asyncio.create_task(stream.__anext__())
            for _ in range(400):
                await sched.publish(sp.InstanceDown("w0", "missed heartbeats"))
                await asyncio.wait([rest], timeout=0.05)
                if rest.done():
                    break
            with pytest.raises(GatewayError, match=r"instance w0 is down \(missed heartbeats\)"):
                await rest
            assert await w1.quiet(0.1)  # never placed again: its output cannot resume
        finally:
            client.close()

    async with running_gateway(sched, request_timeout_s=600, replace_attempts=0) as (gw, _):
        client = GatewayClient(gw.endpoints["clients"], timeout_s=60)
        try:
            done = asyncio.create_task(client.complete([5, 6], PARAMS))
            await w0.recv()
            for _ in range(400):
                await sched.publish(sp.InstanceDown("w0", "missed heartbeats"))
                await asyncio.wait([done], timeout=0.05)
                if done.done():
                    break
            with pytest.raises(GatewayError, match=r"instance w0 is down"):
                await done
        finally:
            client.close()


async def test_alive_to_the_scheduler_and_an_unanswered_place_is_released_later(
    sched: FakeScheduler, workers: tuple[FakeWorker, FakeWorker]
) -> None:
    async with running_gateway(sched, place_timeout_s=0.3, alive_interval_s=0.1) as (gw, _):
        assert await until(lambda: asyncio.sleep(0, bool(sched.alive)))
        alive = sched.alive[0]
        assert (alive.gateway, alive.started_at, alive.interval_s) == (
            gw.cfg.instance_id,
            gw.started_at,
            0.1,
        )
        client = GatewayClient(gw.endpoints["clients"], timeout_s=60)
        try:
            sched.hang = True  # Place is never answered (the scheduler may still charge it)
            with pytest.raises(GatewayError, match="no placement"):
                await client.complete("hi", PARAMS)
            rid = sched.places[-1].request_id
            assert await sched.released(rid) == ["all"]  # once the scheduler answers again
        finally:
            client.close()


async def test_a_real_worker_serves_the_reference_tokens_after_a_replacement(
    cluster: tuple[FakeScheduler, Daemon, Proc],
) -> None:
    """The first instance dies before its first token (a stand-in that never answers);
    the request is placed on the real worker and its tokens are the greedy reference."""
    sched, daemon, worker = cluster
    ghost = FakeWorker("ghost")
    fail_over(sched, ghost.address, "ghost", worker.endpoints["requests"], "w0")
    try:
        async with running_gateway(sched, request_timeout_s=600) as (gw, _):
            client = GatewayClient(gw.endpoints["clients"], timeout_s=60)
            try:
                greedy = SamplingParams(max_tokens=12, ignore_eos=True)
                prompt = [1, *range(40, 85)]
                done = asyncio.create_task(client.complete(prompt, greedy))
                await ghost.recv()
                for _ in range(400):
                    await sched.publish(sp.InstanceDown("ghost", "missed heartbeats"))
                    await asyncio.wait([done], timeout=0.05)
                    if done.done() or len(sched.places) > 1:
                        break
                out = await done
                assert out.token_ids == reference(prompt, 12)
                assert out.final.finish_reason == "length" and out.final.instances == ["w0"]
                assert [p.avoid for p in sched.places] == [[], ["ghost"]]
            finally:
                client.close()
        await idle_and_intact(daemon)
    finally:
        ghost.close()
