"""The gateway's shell on real sockets, with a stand-in scheduler and workers played by
the test (so every chunk's order and timing is chosen here): P/D chunks put in order and
both legs released and aborted, stop strings, a dead instance, silence, placement errors,
overload, duplicate ids, malformed input, a client that leaves, the control socket and a
cluster shutdown. Every Complete gets exactly one Final."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from common.client import GatewayClient, GatewayError
from common.protocol import client as cp
from common.protocol import scheduler as sp
from common.protocol import worker as wp
from common.protocol.worker import TokenChunk
from common.sampling import SamplingParams
from common.security import PLAIN
from common.sockets import DealerSocket
from tests.gateway.harness import (
    TOKEN,
    FakeScheduler,
    FakeWorker,
    admin,
    ids,
    running_gateway,
    until,
)
from tests.raw import raw_socket

pytestmark = pytest.mark.integration

PARAMS = SamplingParams(max_tokens=8)


@pytest.fixture
async def workers() -> AsyncIterator[tuple[FakeWorker, FakeWorker]]:
    a, b = FakeWorker("prefill-0"), FakeWorker("decode-0")
    yield a, b
    a.close()
    b.close()


@pytest.fixture
async def client_factory() -> AsyncIterator[list[GatewayClient]]:
    made: list[GatewayClient] = []
    yield made
    for c in made:
        c.close()


def connect(made: list[GatewayClient], address: str) -> GatewayClient:
    c = GatewayClient(address, timeout_s=10)
    made.append(c)
    return c


async def test_pd_chunks_are_ordered_and_both_phases_released(
    sched: FakeScheduler,
    workers: tuple[FakeWorker, FakeWorker],
    client_factory: list[GatewayClient],
) -> None:
    prefill, decode = workers
    sched.pd(prefill, decode)
    async with running_gateway(sched) as (gw, _):
        client = connect(client_factory, gw.endpoints["clients"])
        done = asyncio.create_task(client.complete([5, 6, 7], PARAMS))
        gen = await prefill.recv()
        assert isinstance(gen, wp.Generate) and gen.token_ids == [5, 6, 7]
        assert gen.handoff is not None and gen.handoff.instance_id == "decode-0"
        assert (
            gen.reply_to == gw.endpoints["replies"] and gen.request_id == sched.places[0].request_id
        )
        rid = gen.request_id
        # The decode worker's chunk overtakes the prefill worker's first token; a repeat.
        await decode.send(gen.reply_to, TokenChunk(rid, ids("bc"), offset=1))
        await prefill.send(gen.reply_to, TokenChunk(rid, ids("a"), num_cached_tokens=16))
        assert await sched.released(rid) == ["prefill"]  # the first token is out
        await decode.send(gen.reply_to, TokenChunk(rid, ids("bc"), offset=1))
        await decode.send(
            gen.reply_to, TokenChunk(rid, ids("d"), finished=True, finish_reason="length", offset=3)
        )
        c = await done
        assert (c.text, c.token_ids) == ("abcd", ids("abcd"))
        f = c.final
        assert (f.finish_reason, f.num_output_tokens, f.num_cached_tokens) == ("length", 4, 16)
        assert f.instances == ["prefill-0", "decode-0"] and f.num_prompt_tokens == 3
        assert f.ttft_s > 0 and f.total_s >= f.ttft_s
        assert await sched.released(rid, 2) == ["all", "prefill"]
        # The workers ended it themselves: no Abort to either.
        assert await prefill.quiet(0.1) and await decode.quiet(0.0)

        # Cancel mid-stream: both legs hear Abort, the stream ends with "abort".
        stream = client.generate([5, 6], PARAMS, request_id="c1")
        first = asyncio.create_task(stream.__anext__())  # sends the Complete
        gen = await prefill.recv()
        await prefill.send(gen.reply_to, TokenChunk(gen.request_id, ids("x")))
        assert await first == "x"
        await client.cancel("c1")
        assert [t async for t in stream] == []
        assert client.last_final is not None and client.last_final.finish_reason == "abort"
        assert await prefill.recv() == wp.Abort(gen.request_id)
        assert await decode.recv() == wp.Abort(gen.request_id)
        assert await sched.released(gen.request_id, 2) == ["all", "prefill"]


async def test_a_stop_string_ends_the_stream_and_aborts_the_worker(
    sched: FakeScheduler,
    workers: tuple[FakeWorker, FakeWorker],
    client_factory: list[GatewayClient],
) -> None:
    w = workers[0]
    sched.colocated(w)
    async with running_gateway(sched) as (gw, _):
        client = connect(client_factory, gw.endpoints["clients"])
        done = asyncio.create_task(client.complete("hi", SamplingParams(stop=["END"])))
        gen = await w.recv()
        await w.send(gen.reply_to, TokenChunk(gen.request_id, ids("okE")))
        await w.send(gen.reply_to, TokenChunk(gen.request_id, ids("NDmore"), offset=3))
        c = await done
        assert (c.text, c.final.finish_reason) == ("ok", "stop")
        assert await w.recv() == wp.Abort(gen.request_id)
        # A late chunk of the ended request is dropped; the gateway serves on.
        await w.send(gen.reply_to, TokenChunk(gen.request_id, ids("late"), offset=9))
        nxt = asyncio.create_task(client.complete("hi", PARAMS))
        gen2 = await w.recv()
        await w.send(
            gen2.reply_to,
            TokenChunk(gen2.request_id, ids("fine"), finished=True, finish_reason="stop"),
        )
        assert (await nxt).text == "fine"
        st = await admin(gw.endpoints["control"], "status")
        assert st.ok and (st.result["served"], st.result["inflight"]) == (2, 0)


async def test_instance_down_fails_its_requests_at_once(
    sched: FakeScheduler,
    workers: tuple[FakeWorker, FakeWorker],
    client_factory: list[GatewayClient],
) -> None:
    prefill, decode = workers
    sched.pd(prefill, decode)
    async with running_gateway(sched, request_timeout_s=600) as (gw, _):
        client = connect(client_factory, gw.endpoints["clients"])
        done = asyncio.create_task(client.complete([5, 6, 7], PARAMS))
        gen = await prefill.recv()
        await prefill.send(gen.reply_to, TokenChunk(gen.request_id, ids("a")))
        assert await sched.released(gen.request_id) == ["prefill"]  # the token is out
        # Published until the gateway's subscription has joined and the request failed.
        for _ in range(200):
            await sched.publish(sp.InstanceDown("decode-0", "missed heartbeats"))
            await asyncio.wait([done], timeout=0.05)
            if done.done():
                break
        with pytest.raises(GatewayError, match=r"instance decode-0 is down \(missed heartbeats\)"):
            await done
        assert await prefill.recv() == wp.Abort(gen.request_id)  # the live leg stops
        assert await decode.quiet(0.1)  # nothing is sent to the dead one
        assert await sched.released(gen.request_id, 2) == ["all", "prefill"]


async def test_a_silent_worker_fails_the_request_and_is_aborted(
    sched: FakeScheduler,
    workers: tuple[FakeWorker, FakeWorker],
    client_factory: list[GatewayClient],
) -> None:
    w = workers[0]
    sched.colocated(w)
    async with running_gateway(sched, request_timeout_s=0.3) as (gw, _):
        client = connect(client_factory, gw.endpoints["clients"])
        with pytest.raises(GatewayError, match=r"no answer from w0 for 0.3 s"):
            await client.complete("hi", PARAMS)
        gen = await w.recv()
        assert await w.recv() == wp.Abort(gen.request_id)
        assert await sched.released(gen.request_id) == ["all"]


async def test_placement_errors_end_the_request_with_that_error(
    sched: FakeScheduler, client_factory: list[GatewayClient]
) -> None:
    async with running_gateway(sched, place_timeout_s=0.3) as (gw, _):
        client = connect(client_factory, gw.endpoints["clients"])
        sched.error = "no colocated instance is up"
        with pytest.raises(GatewayError, match="no placement: .*no colocated instance is up"):
            await client.complete("hi", PARAMS)
        sched.error, sched.hang = "", True
        with pytest.raises(GatewayError, match="no placement: .*no reply within 0.3 s"):
            await client.complete("hi", PARAMS)
        with pytest.raises(GatewayError, match="unknown session 'nope'"):
            await client.complete("hi", PARAMS, session_id="nope")
        st = await admin(gw.endpoints["control"], "status")
        assert (st.result["failed"], st.result["inflight"]) == (3, 0)


async def test_overload_duplicates_and_malformed_input_get_an_error_each(
    sched: FakeScheduler,
    workers: tuple[FakeWorker, FakeWorker],
    client_factory: list[GatewayClient],
) -> None:
    w = workers[0]
    sched.colocated(w)
    async with running_gateway(sched, max_inflight=1) as (gw, _):
        raw = DealerSocket(gw.endpoints["clients"], cp.ClientReply, security=PLAIN)
        try:
            await raw.send(cp.Complete("x", prompt="hi"))
            gen = await w.recv()  # in flight: the one slot is taken
            await raw.send(cp.Complete("x", prompt="hi"))
            dup = await asyncio.wait_for(raw.recv(), 10)
            assert isinstance(dup, cp.Final) and dup.request_id == "x"
            assert "already in flight" in dup.error
            other = connect(client_factory, gw.endpoints["clients"])
            with pytest.raises(GatewayError, match="overloaded: 1 requests in flight"):
                await other.complete("hi", PARAMS)
            # Bytes that are no message: an error that names no request; serving goes on.
            sock = raw_socket(zmq.DEALER, PLAIN)
            sock.connect(gw.endpoints["clients"])
            await sock.send_multipart([b"\xc1 not msgpack"])
            bad = await asyncio.wait_for(sock.recv_multipart(), 10)
            sock.close(0)
            assert b"malformed request" in bad[0]
            await w.send(
                gen.reply_to,
                TokenChunk(gen.request_id, ids("ok"), finished=True, finish_reason="stop"),
            )
            chunk, final = await raw.recv(), await raw.recv()
            assert isinstance(chunk, cp.Chunk) and chunk.text == "ok"
            assert isinstance(final, cp.Final) and final.request_id == "x" and not final.error
            nxt = asyncio.create_task(other.complete("hi", PARAMS))
            gen2 = await w.recv()
            await w.send(
                gen2.reply_to,
                TokenChunk(gen2.request_id, ids("yes"), finished=True, finish_reason="stop"),
            )
            assert (await nxt).text == "yes"
        finally:
            raw.close()


async def test_a_client_that_leaves_gets_its_requests_aborted(
    sched: FakeScheduler,
    workers: tuple[FakeWorker, FakeWorker],
) -> None:
    w = workers[0]
    sched.colocated(w)
    async with running_gateway(sched) as (gw, _):
        client = GatewayClient(gw.endpoints["clients"], timeout_s=10)
        stream = client.generate("hi", PARAMS)
        first = asyncio.create_task(stream.__anext__())
        gen = await w.recv()
        await w.send(gen.reply_to, TokenChunk(gen.request_id, ids("a")))
        assert await first == "a"
        client.close()  # gone without a Cancel
        # The gateway learns it at its next send to that client.
        offset = 1

        async def aborted() -> bool:
            nonlocal offset
            if not await w.quiet(0.0):
                return await w.recv() == wp.Abort(gen.request_id)
            await w.send(gen.reply_to, TokenChunk(gen.request_id, ids("b"), offset=offset))
            offset += 1
            return False

        assert await until(aborted)
        assert gw.core.requests == {}
        assert await sched.released(gen.request_id) == ["all"]


async def test_control_socket_status_refusal_and_shutdown(
    sched: FakeScheduler, client_factory: list[GatewayClient]
) -> None:
    async with running_gateway(sched, instance_id="gw-a") as (gw, task):
        control = gw.endpoints["control"]
        refused = await admin(control, "status", token="wrong")
        assert not refused.ok and "token" in refused.error and refused.result is None
        assert await admin(control, "status", token="") == refused
        client = connect(client_factory, gw.endpoints["clients"])
        sid = await client.open_session()
        st = await admin(control, "status")
        assert st.ok
        assert {k: st.result[k] for k in ("service", "instance_id", "inflight", "sessions")} == {
            "service": "gateway",
            "instance_id": "gw-a",
            "inflight": 0,
            "sessions": 1,
        }
        assert st.result["uptime_s"] >= 0 and (st.result["served"], st.result["failed"]) == (0, 0)
        await client.close_session(sid)
        assert (await admin(control, "status")).result["sessions"] == 0
        assert not (await admin(control, "drain")).ok
        assert (await admin(control, "shutdown", token=TOKEN)).ok
        await asyncio.wait_for(task, 10)  # serve() returns


async def test_cluster_shutdown_fails_everything_and_stops(
    sched: FakeScheduler,
    workers: tuple[FakeWorker, FakeWorker],
    client_factory: list[GatewayClient],
) -> None:
    w = workers[0]
    sched.colocated(w)
    async with running_gateway(sched) as (gw, task):
        client = connect(client_factory, gw.endpoints["clients"])
        done = asyncio.create_task(client.complete("hi", PARAMS))
        gen = await w.recv()
        for _ in range(200):
            await sched.publish(sp.ClusterShutdown("admin shutdown"))
            await asyncio.wait([task], timeout=0.05)
            if task.done():
                break
        assert task.done()
        with pytest.raises(GatewayError, match="cluster stopping: admin shutdown"):
            await done
        assert await w.recv() == wp.Abort(gen.request_id)
