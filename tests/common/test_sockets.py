"""Typed ZeroMQ sockets over real loopback TCP: push/pull, pub/sub, RPC."""

from __future__ import annotations

import asyncio
import random

import msgspec
import pytest
import torch
import zmq
from zmq.utils.monitor import parse_monitor_message

from common import sockets
from common.codec import Decoder, encode
from common.errors import ErrorKind
from common.logging import Throttled
from common.sockets import (
    CONTROL_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DealerSocket,
    ErrorReply,
    PubSocket,
    PullSocket,
    PushSocket,
    RouterSocket,
    RpcClient,
    RpcClosed,
    RpcError,
    RpcServer,
    RpcTimeout,
    SubSocket,
)
from tests.raw import raw_socket

pytestmark = pytest.mark.integration

ANY_PORT = "tcp://127.0.0.1:0"


class Blocks(msgspec.Struct):
    seq_id: int
    kv: torch.Tensor


class Event(msgspec.Struct):
    n: int


class Double(msgspec.Struct):
    x: int
    delay_s: float = 0.0


class Doubled(msgspec.Struct):
    x: int
    result: int


class Unrelated(msgspec.Struct):
    name: str


async def test_push_pull_round_trip_with_tensor() -> None:
    with PullSocket(ANY_PORT, Blocks, bind=True) as pull:
        assert pull.address.startswith("tcp://127.0.0.1:")
        assert not pull.address.endswith(":0")
        with PushSocket(pull.address, Blocks, bind=False) as push:
            kv = torch.randn(4, 2, 16, dtype=torch.float16)
            await push.send(Blocks(seq_id=7, kv=kv))
            got = await asyncio.wait_for(pull.recv(), 5)
    assert got.seq_id == 7
    assert torch.equal(got.kv, kv)


async def test_poll_reports_pending_messages() -> None:
    with (
        PullSocket(ANY_PORT, Event, bind=True) as pull,
        PushSocket(pull.address, Event, bind=False) as push,
    ):
        assert await pull.poll(0.05) is False
        await push.send(Event(1))
        assert await pull.poll(5) is True
        assert await pull.recv() == Event(1)


async def test_pub_sub_filters_by_topic() -> None:
    with (
        PubSocket(ANY_PORT, Event, bind=True) as pub,
        SubSocket(pub.address, Event, bind=False, topics=[b"kv."]) as sub,
    ):
        received: list[tuple[bytes, Event]] = []
        # A SUB socket misses what was published before its subscription reached the
        # publisher, so publish until messages start to arrive.
        for n in range(200):
            await pub.publish(b"other", Event(n))
            await pub.publish(b"kv.evict", Event(n))
            if await sub.poll(0.01):
                break
        while await sub.poll(0.05):
            received.append(await sub.recv())
    assert received
    assert {topic for topic, _ in received} == {b"kv.evict"}
    numbers = [event.n for _, event in received]
    assert numbers == sorted(numbers)


async def test_bind_conflict_names_the_address() -> None:
    with (
        PullSocket(ANY_PORT, Event, bind=True) as first,
        pytest.raises(OSError, match=f"cannot bind {first.address}"),
    ):
        PullSocket(first.address, Event, bind=True)


async def double(req: Double) -> Doubled:
    await asyncio.sleep(req.delay_s)
    if req.x < 0:
        raise ValueError(f"negative input {req.x}")
    return Doubled(x=req.x, result=2 * req.x)


async def test_rpc_concurrent_calls_get_their_own_replies() -> None:
    server = RpcServer(ANY_PORT, Double, Doubled)
    serving = asyncio.create_task(server.serve(double))
    clients = [RpcClient(server.address, Double, Doubled) for _ in range(2)]
    try:
        # Random delays make the server answer out of order.
        calls = [
            clients[i % 2].call(Double(x=i, delay_s=random.uniform(0, 0.05)), timeout_s=5)
            for i in range(40)
        ]
        replies = await asyncio.gather(*calls)
        assert [r.x for r in replies] == list(range(40))
        assert all(r.result == 2 * r.x for r in replies)
    finally:
        for client in clients:
            client.close()
        server.close()
    await asyncio.wait_for(serving, 5)  # a closed server's serve() returns normally


async def test_rpc_timeout_names_the_address() -> None:
    with raw_socket(zmq.ROUTER, bind=True) as silent:
        # A peer that accepts connections but never answers.
        port = silent.bind_to_random_port("tcp://127.0.0.1")
        client = RpcClient(f"tcp://127.0.0.1:{port}", Double, Doubled)
        try:
            with pytest.raises(RpcTimeout, match=f"tcp://127.0.0.1:{port}.*0.2 s") as info:
                await client.call(Double(1), timeout_s=0.2)
            assert isinstance(info.value, TimeoutError)
        finally:
            client.close()


async def test_rpc_timeout_without_any_server() -> None:
    client = RpcClient("tcp://127.0.0.1:1", Double, Doubled)
    try:
        with pytest.raises(RpcTimeout, match="tcp://127.0.0.1:1"):
            await client.call(Double(1), timeout_s=0.2)
    finally:
        client.close()


async def test_malformed_request_gets_error_reply_and_server_keeps_serving() -> None:
    server = RpcServer(ANY_PORT, Double, Doubled)
    serving = asyncio.create_task(server.serve(double))
    raw = raw_socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server.address)
    client = RpcClient(server.address, Double, Doubled)
    wrong_type = RpcClient(server.address, Unrelated, Doubled)
    try:
        request_id = (12345).to_bytes(8, "big")
        await raw.send_multipart([request_id, b"\xc1garbage"])
        reply = await asyncio.wait_for(raw.recv_multipart(), 5)
        assert reply[:2] == [request_id, b"\x01"]
        error = Decoder(ErrorReply).decode(reply[2:])
        assert error.message.startswith("malformed request: cannot decode Double")

        with pytest.raises(RpcError, match="malformed request.*missing required field `x`"):
            await wrong_type.call(Unrelated("nope"), timeout_s=5)

        assert await client.call(Double(21), timeout_s=5) == Doubled(x=21, result=42)
    finally:
        raw.close()
        client.close()
        wrong_type.close()
        server.close()
    await asyncio.wait_for(serving, 5)


async def test_a_flood_of_malformed_requests_writes_a_few_warning_lines(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each malformed request is still answered, but the log gets the throttle's burst and
    then silence (common.sockets.warn): a peer cannot flood the log."""
    # A throttle of this test's own: the process-wide one may have spent its burst.
    monkeypatch.setattr(sockets, "warn", Throttled(sockets.log, burst=3, interval_s=3600))
    server = RpcServer(ANY_PORT, Double, Doubled)
    serving = asyncio.create_task(server.serve(double))
    raw = raw_socket(zmq.DEALER)
    raw.connect(server.address)
    try:
        for i in range(40):
            await raw.send_multipart([(i).to_bytes(8, "big"), b"\xc1garbage"])
            reply = await asyncio.wait_for(raw.recv_multipart(), 5)
            assert reply[1] == b"\x01"
    finally:
        raw.close()
        server.close()
    await asyncio.wait_for(serving, 5)
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).splitlines()
    assert sum("malformed rpc request" in line for line in lines) == 3


async def test_handler_exception_becomes_rpc_error() -> None:
    server = RpcServer(ANY_PORT, Double, Doubled)
    serving = asyncio.create_task(server.serve(double))
    client = RpcClient(server.address, Double, Doubled)
    try:
        with pytest.raises(RpcError, match=r"^ValueError: negative input -3$") as info:
            await client.call(Double(-3), timeout_s=5)
        assert info.value.address == server.address
        assert await client.call(Double(4), timeout_s=5) == Doubled(x=4, result=8)
    finally:
        client.close()
        server.close()
    await asyncio.wait_for(serving, 5)


async def test_close_fails_pending_calls() -> None:
    server = RpcServer(ANY_PORT, Double, Doubled)
    serving = asyncio.create_task(server.serve(double))
    client = RpcClient(server.address, Double, Doubled)
    try:
        pending = asyncio.create_task(client.call(Double(1, delay_s=30), timeout_s=60))
        await asyncio.sleep(0.1)
        client.close()
        with pytest.raises(RpcClosed, match="closed"):
            await asyncio.wait_for(pending, 5)
        with pytest.raises(RpcClosed):
            await client.call(Double(2))
    finally:
        server.close()
    await asyncio.wait_for(serving, 5)


async def test_cancelling_serve_cancels_in_flight_handlers() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(req: Double) -> Doubled:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Doubled(req.x, req.x)

    with (
        RpcServer(ANY_PORT, Double, Doubled) as server,
        RpcClient(server.address, Double, Doubled) as client,
    ):
        serving = asyncio.create_task(server.serve(stuck))
        call = asyncio.create_task(client.call(Double(1), timeout_s=30))
        await asyncio.wait_for(started.wait(), 5)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        assert cancelled.is_set()
        call.cancel()


class Ping(msgspec.Struct, tag=True):
    n: int


class Pong(msgspec.Struct, tag=True):
    n: int


PingPong = Ping | Pong


async def test_a_union_channel_carries_each_of_its_messages() -> None:
    # The union alias types the socket (PullSocket[Ping | Pong]); no cast needed.
    with (
        PullSocket(ANY_PORT, PingPong, bind=True) as pull,
        PushSocket(pull.address, PingPong, bind=False) as push,
    ):
        await push.send(Ping(1))
        await push.send(Pong(2))
        got = [await asyncio.wait_for(pull.recv(), 5) for _ in range(2)]
    assert got == [Ping(1), Pong(2)]


async def test_call_for_refuses_a_reply_of_another_kind() -> None:
    async def answer(req: PingPong) -> PingPong:
        return Pong(req.n) if isinstance(req, Ping) else Ping(req.n)

    with (
        RpcServer(ANY_PORT, PingPong, PingPong) as server,
        RpcClient(server.address, PingPong, PingPong) as client,
    ):
        serving = asyncio.create_task(server.serve(answer))
        assert await client.call_for(Ping(3), Pong, timeout_s=5) == Pong(3)
        with pytest.raises(RpcError, match="Ping to .* answered with Pong, not Ping") as info:
            await client.call_for(Ping(4), Ping, timeout_s=5)
        assert info.value.kind == ErrorKind.INTERNAL
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)


class Blob(msgspec.Struct):
    data: bytes


class Size(msgspec.Struct):
    n: int


async def test_each_socket_kind_bounds_the_messages_it_accepts() -> None:
    """Receivers of unchosen peers get the default, send-only sockets a small one, clients
    none; the owner may set any."""
    with (
        RpcServer(ANY_PORT, Blob, Size) as server,
        RpcServer(ANY_PORT, Blob, Size, max_message_bytes=1 << 30) as tensors,
        RpcClient(server.address, Blob, Size) as client,
        PullSocket(ANY_PORT, Event, bind=True) as pull,
        PushSocket(pull.address, Event, bind=False) as push,
        SubSocket(ANY_PORT, Event, bind=True) as sub,
        PubSocket(sub.address, Event, bind=False) as pub,
        RouterSocket(ANY_PORT, Event) as router,
        DealerSocket(router.address, Event) as dealer,
    ):
        limits = {
            sock: sock._sock.getsockopt(zmq.MAXMSGSIZE)
            for sock in (server, tensors, client, pull, push, sub, pub, router, dealer)
        }
    for sock in (server, pull, sub, router):
        assert sock.max_message_bytes == limits[sock] == DEFAULT_MAX_MESSAGE_BYTES
    for sock in (push, pub):
        assert sock.max_message_bytes == limits[sock] == CONTROL_MAX_MESSAGE_BYTES
    for sock in (client, dealer):
        assert sock.max_message_bytes is None and limits[sock] == -1
    assert tensors.max_message_bytes == limits[tensors] == 1 << 30
    with pytest.raises(ValueError, match="max_message_bytes"):
        PullSocket(ANY_PORT, Event, bind=True, max_message_bytes=0)


async def test_rpc_server_drops_a_peer_that_sends_an_oversized_message() -> None:
    """libzmq disconnects the peer on the frame's header: the oversized request never
    reaches the handler (nor an error reply), and the server keeps serving."""
    limit = 64 << 10
    seen: list[int] = []

    async def measure(req: Blob) -> Size:
        seen.append(len(req.data))
        return Size(len(req.data))

    raw = raw_socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    monitor = raw.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    with (
        RpcServer(ANY_PORT, Blob, Size, max_message_bytes=limit) as server,
        RpcClient(server.address, Blob, Size) as client,
    ):
        serving = asyncio.create_task(server.serve(measure))
        try:
            raw.connect(server.address)
            events = [parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 10))]
            assert events[0]["event"] == zmq.EVENT_CONNECTED
            big = (1).to_bytes(8, "big")
            await raw.send_multipart([big, *encode(Blob(b"\xee" * (4 * limit)))])
            event = parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), 10))
            assert event["event"] == zmq.EVENT_DISCONNECTED  # the server cut the peer off
            # Positive control: the same peer (it reconnects) and a typed client are served.
            small = (2).to_bytes(8, "big")
            await raw.send_multipart([small, *encode(Blob(b"\x01" * 100))])
            reply = await asyncio.wait_for(raw.recv_multipart(), 10)
            assert reply[:2] == [small, b"\x00"]  # no reply, error or not, to the oversized one
            assert Decoder(Size).decode(reply[2:]) == Size(100)
            assert (await client.call(Blob(b"\x02" * (limit // 2)), timeout_s=10)).n == limit // 2
            assert seen == [100, limit // 2]
        finally:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
            monitor.close(linger=0)
            raw.close(linger=0)
