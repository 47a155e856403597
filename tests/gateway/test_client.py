"""The Python client against a gateway played by the test (a bare ROUTER): a silent gateway
raises a timeout, never hangs; closing wakes waiting calls; leaving a stream early sends
Cancel; an error Final raises; a gateway that stops answering pings is `GatewayGone` in a
few beats (long before the timeout), a request is retried under a fresh id only if no
token was streamed. And the ROUTER side: a client that stops reading is dropped instead
of stalling the server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import zmq
import zmq.asyncio

from common.client import (
    GatewayClient,
    GatewayClosed,
    GatewayError,
    GatewayGone,
    GatewayTimeout,
)
from common.codec import encode
from common.protocol import client as cp
from common.sampling import SamplingParams
from common.security import PLAIN
from common.sockets import PeerGone, RouterSocket
from tests.raw import raw_socket

pytestmark = pytest.mark.integration


@pytest.fixture
async def router() -> AsyncIterator[RouterSocket[Any]]:
    sock = RouterSocket("tcp://127.0.0.1:0", cp.ClientRequest, security=PLAIN)
    yield sock
    sock.close()


async def test_a_silent_gateway_times_out(router: RouterSocket[Any]) -> None:
    client = GatewayClient(router.address, timeout_s=0.3, heartbeat_s=None)
    try:
        with pytest.raises(GatewayTimeout, match="no message from the gateway"):
            await client.complete("hi")
        with pytest.raises(GatewayTimeout):
            await client.open_session()
        _, first = await router.recv()
        assert isinstance(first, cp.Complete) and first.prompt == "hi"
        _, cancel = await router.recv()  # the timed-out request is cancelled at the gateway
        assert cancel == cp.Cancel(first.request_id)
    finally:
        client.close()


async def test_streams_cancel_when_left_and_raise_on_an_error(router: RouterSocket[Any]) -> None:
    client = GatewayClient(router.address, timeout_s=10, heartbeat_s=None)
    try:
        stream = client.generate([5, 6], SamplingParams(max_tokens=4))
        first = asyncio.create_task(stream.__anext__())
        peer, req = await router.recv()
        assert isinstance(req, cp.Complete) and req.token_ids == [5, 6]
        await router.send_to(peer, cp.Chunk(req.request_id, "he", [1, 2]))
        assert await first == "he"
        await stream.aclose()  # leaving early
        assert await router.recv() == (peer, cp.Cancel(req.request_id))

        failing = asyncio.create_task(client.complete("x", request_id="mine"))
        _, req = await router.recv()
        assert req.request_id == "mine"
        with pytest.raises(ValueError, match="already in flight"):  # ids are per request
            await client.complete("y", request_id="mine")
        await router.send_to(peer, cp.Final("mine", "error", "prompt too long: 9 tokens"))
        with pytest.raises(GatewayError, match="prompt too long") as err:
            await failing
        assert err.value.final.request_id == "mine"

        waiting = asyncio.create_task(client.complete("z"))
        await router.recv()
        client.close()
        with pytest.raises(GatewayClosed):
            await waiting
    finally:
        client.close()


async def test_a_gateway_that_stops_answering_is_gone_long_before_the_timeout(
    router: RouterSocket[Any],
) -> None:
    client = GatewayClient(router.address, timeout_s=600, heartbeat_s=0.1, retries=1)
    try:
        waiting = asyncio.create_task(client.complete("hi"))
        peer, first = await router.recv()
        assert isinstance(first, cp.Complete)
        seen: list[Any] = []
        while not any(isinstance(m, cp.Ping) for m in seen):  # it checks on the silence...
            seen.append((await router.recv())[1])
        await router.send_to(peer, cp.Pong())  # ...and an answer keeps it waiting
        # Then nothing answers: the first try is given up (Cancel); the retry waits for the
        # gateway to answer a ping, which it never does, so it is never sent.
        msgs: list[Any] = []
        while not waiting.done():
            if await router.poll(0.05):
                msgs.append((await router.recv())[1])
        with pytest.raises(GatewayGone, match=r"stopped answering.*tried 2 times"):
            await waiting
        assert cp.Cancel(first.request_id) in msgs
        assert not any(isinstance(m, cp.Complete) for m in msgs)
    finally:
        client.close()


async def test_a_retry_succeeds_but_streamed_tokens_are_never_retried(
    router: RouterSocket[Any],
) -> None:
    client = GatewayClient(router.address, timeout_s=600, heartbeat_s=0.1, retries=3)
    try:
        # The first try is never answered; once it is given up, the gateway is back (it
        # answers a ping) and the retry, under a fresh id, is answered.
        waiting = asyncio.create_task(client.complete([1, 2], request_id="r"))
        back = False
        while True:
            peer, msg = await router.recv()
            back = back or msg == cp.Cancel("r")
            if back and isinstance(msg, cp.Ping):
                await router.send_to(peer, cp.Pong())
            if isinstance(msg, cp.Complete) and msg.request_id == "r~1":
                break
        await router.send_to(peer, cp.Chunk("r~1", "ok", [7]))
        await router.send_to(peer, cp.Final("r~1", "stop"))
        done = await waiting
        assert (done.text, done.token_ids) == ("ok", [7])

        # A request that got a token, then silence: never sent again.
        stream = client.stream([3], request_id="s")
        first = asyncio.create_task(stream.__anext__())
        peer, msg = await router.recv()
        assert isinstance(msg, cp.Complete) and msg.request_id == "s"
        await router.send_to(peer, cp.Chunk("s", "a", [9]))
        assert isinstance(await first, cp.Chunk)
        with pytest.raises(GatewayGone, match="after 1 tokens of request s") as err:
            await stream.__anext__()
        assert err.value.streamed == 1
        while await router.poll(0.3):
            _, msg = await router.recv()
            assert not isinstance(msg, cp.Complete), "a streamed request was retried"

        # Session calls learn it too.
        with pytest.raises(GatewayGone):
            await client.open_session()
    finally:
        client.close()


async def test_a_client_that_stops_reading_is_dropped() -> None:
    server = RouterSocket("tcp://127.0.0.1:0", cp.ClientRequest, sndhwm=4, security=PLAIN)
    reader = raw_socket(zmq.DEALER, PLAIN)
    reader.setsockopt(zmq.RCVHWM, 4)
    reader.setsockopt(zmq.RCVBUF, 4096)
    reader.connect(server.address)
    try:
        await reader.send_multipart(encode(cp.OpenSession()))  # the server learns the peer
        peer, _ = await server.recv()
        big = cp.Chunk("r", "x" * 65536)
        with pytest.raises(PeerGone, match="not reading"):
            for _ in range(10_000):  # never: the queues and the TCP buffers fill long before
                await server.send_to(peer, big)
                await asyncio.sleep(0)
    finally:
        reader.close(0)
        server.close()
