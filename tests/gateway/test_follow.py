"""The gateway follows which instance streams each request (KunServe groups): after a drop
a request that ran on a follower goes on streaming from the group's leader (same request
id, offsets going on), after a restore from its home member again; the death of the
instance it left no longer fails it, the death of the one streaming it does. Driven on
the pure core, then on the shell with real sockets (a stand-in scheduler and workers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from common.client import GatewayClient, GatewayError
from common.protocol import client as cp
from common.protocol import scheduler as sp
from common.protocol import worker as wp
from common.protocol.worker import TokenChunk
from common.sampling import SamplingParams
from services.gateway.core import GatewayCore, Request
from services.gateway.stream import Leg
from tests.gateway.core_helpers import A, admitted, core
from tests.gateway.harness import FakeScheduler, FakeWorker, ids, running_gateway, until


def placed_on(c: GatewayCore, instance_id: str, rid: str = "1") -> Request:
    r = admitted(c, A, cp.Complete(rid, token_ids=[5, 6, 7]))
    c.placed(
        r, sp.Placement(r.rid, instance_id, address=f"tcp://{instance_id}", mode="c", policy="t")
    )
    return r


def test_a_chunk_from_another_instance_moves_the_leg_and_late_ones_do_not() -> None:
    c = core()
    placed_on(c, "w0", "other")  # the gateway has placed on the leader before: its address
    r = placed_on(c, "w1")
    s = r.stream
    assert s.accept(TokenChunk(r.rid, [10, 11], offset=0, instance_id="w1"), 1.0).token_ids
    # Dropped: the leader (w0) adopted it and says so with an empty chunk at offset 2.
    took_over = TokenChunk(r.rid, [], offset=2, instance_id="w0")
    assert c.follow(r, took_over) == Leg("w1", "tcp://w1")
    assert s.legs == [Leg("w0", "tcp://w0")] and r.left == ("w1", 2)
    assert s.accept(took_over, 1.1).token_ids == []
    assert r in c.on_instance("w0") and r not in c.on_instance("w1")
    # A late chunk of w1 from before the move is consumed by offset, the leg stays.
    late = TokenChunk(r.rid, [11], offset=1, instance_id="w1")
    assert c.follow(r, late) is None and s.legs == [Leg("w0", "tcp://w0")]
    assert s.accept(late, 1.2).token_ids == []  # a repeat
    assert s.accept(TokenChunk(r.rid, [12, 13], offset=2, instance_id="w0"), 1.3).token_ids == [
        12,
        13,
    ]
    # Restored: home (w1) streams it again from where the group left it.
    home = TokenChunk(r.rid, [14], offset=4, instance_id="w1")
    assert c.follow(r, home) == Leg("w0", "tcp://w0")
    assert s.legs == [Leg("w1", "tcp://w1")] and r in c.on_instance("w1")
    up = s.accept(TokenChunk(r.rid, [14], offset=4, finished=True, instance_id="w1"), 1.4)
    assert s.output_ids == [10, 11, 12, 13, 14] and up.final is not None
    assert up.final.instances == ["w1", "w0"]
    # A chunk of a known leg, or naming no instance, moves nothing.
    r2 = placed_on(c, "w2", "2")
    assert c.follow(r2, TokenChunk(r2.rid, [1], instance_id="w2")) is None
    assert c.follow(r2, TokenChunk(r2.rid, [1])) is None
    # An instance never placed on: the leg moves, with no address to abort it at...
    assert c.follow(r2, TokenChunk(r2.rid, [], offset=1, instance_id="w9")) is not None
    assert r2.stream.legs == [Leg("w9", "")]
    # ... unless the hand-over chunk names it (the worker that took it over says where).
    handed = TokenChunk(r2.rid, [], offset=1, instance_id="w8", address="tcp://w8")
    assert c.follow(r2, handed) == Leg("w9", "")
    assert r2.stream.legs == [Leg("w8", "tcp://w8")] and c.addresses["w8"] == "tcp://w8"


@pytest.fixture
async def sched() -> AsyncIterator[FakeScheduler]:
    s = FakeScheduler()
    yield s
    await s.close()


async def down_until_failed(sched: FakeScheduler, iid: str, done: asyncio.Task[Any]) -> None:
    """Publish InstanceDown(iid) until `done` ends (the subscription joins late)."""
    for _ in range(200):
        await sched.publish(sp.InstanceDown(iid, "missed heartbeats"))
        await asyncio.wait([done], timeout=0.05)
        if done.done():
            return


async def streamed_by(core: GatewayCore, rid: str, iid: str, n: int) -> None:
    """Until the gateway consumed `n` tokens of `rid`, streamed by `iid` (chunks from two
    workers arrive on one socket in no set order)."""

    async def check() -> bool:
        r = core.requests.get(rid)
        return (
            r is not None
            and [leg.instance_id for leg in r.stream.legs] == [iid]
            and len(r.stream.output_ids) == n
        )

    assert await until(check), f"{rid} not streamed by {iid}"


@pytest.mark.integration
async def test_the_gateway_follows_a_request_to_the_leader_and_its_deaths(
    sched: FakeScheduler,
) -> None:
    w0, w1, w2 = FakeWorker("w0"), FakeWorker("w1"), FakeWorker("w2")
    client = None
    try:
        sched.colocated(w1, "w1")
        async with running_gateway(sched, request_timeout_s=600) as (gw, _):
            client = GatewayClient(gw.endpoints["clients"], timeout_s=10)
            params = SamplingParams(max_tokens=8)
            moved = asyncio.create_task(client.complete([5, 6], params, request_id="moved"))
            gen = await w1.recv()
            stays = asyncio.create_task(client.complete([7, 8], params, request_id="stays"))
            gen2 = await w1.recv()
            assert isinstance(gen, wp.Generate) and isinstance(gen2, wp.Generate)
            rid = gen.request_id
            await w1.send(gen.reply_to, TokenChunk(rid, ids("ab"), instance_id="w1"))
            await w1.send(gen.reply_to, TokenChunk(gen2.request_id, ids("x"), instance_id="w1"))
            # The group's leader took "moved" over: it says so, then streams on.
            await w0.send(gen.reply_to, TokenChunk(rid, [], offset=2, instance_id="w0"))
            await w0.send(gen.reply_to, TokenChunk(rid, ids("c"), offset=2, instance_id="w0"))
            await streamed_by(gw.core, rid, "w0", 3)
            # w1 dies: the request still on it fails, the moved one does not.
            await down_until_failed(sched, "w1", stays)
            with pytest.raises(GatewayError, match=r"instance w1 is down"):
                await stays
            assert not moved.done()
            await w0.send(
                gen.reply_to,
                TokenChunk(
                    rid, ids("d"), offset=3, finished=True, finish_reason="length", instance_id="w0"
                ),
            )
            c = await moved
            assert (c.text, c.final.instances) == ("abcd", ["w1", "w0"])

            # And the death of the instance streaming a moved request fails it (placed on
            # w2 this time: w1's InstanceDowns still in flight cannot touch it).
            sched.colocated(w2, "w2")
            third = asyncio.create_task(client.complete([9], params, request_id="third"))
            gen3 = await w2.recv()
            assert isinstance(gen3, wp.Generate)
            await w0.send(gen3.reply_to, TokenChunk(gen3.request_id, [], instance_id="w0"))
            await w0.send(gen3.reply_to, TokenChunk(gen3.request_id, ids("z"), instance_id="w0"))
            await streamed_by(gw.core, gen3.request_id, "w0", 1)
            await down_until_failed(sched, "w0", third)
            with pytest.raises(GatewayError, match=r"instance w0 is down"):
                await third
    finally:
        if client is not None:
            client.close()
        for w in (w0, w1, w2):
            w.close()
