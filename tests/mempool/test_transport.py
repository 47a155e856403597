"""Transport unit tests: run coalescing, the wire header, the registry, and receiver
behaviour (cancel, unknown ids, timeouts, discarded and duplicate data) in one process."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import threading
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.security import data_plane_key
from services.mempool.region import HostRegion, ShmRegion
from services.mempool.transport import (
    ChecksumMismatch,
    CopyRun,
    Receiver,
    Sender,
    TransferError,
    TransferTimeout,
    available_transports,
    coalesce,
    make_transport,
)
from services.mempool.transport.frame import (
    HEADER_SIZE,
    AckStatus,
    FrameError,
    Header,
    Kind,
)
from services.mempool.transport.handshake import (
    CHALLENGE_SIZE,
    HELLO_SIZE,
    PROOF_SIZE,
    Initiator,
    Responder,
)
from services.mempool.transport.shm import ShmReceiver, ShmSender
from services.mempool.transport.tcp import TcpReceiver, TcpSender
from services.mempool.transport.tracking import Coverage

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
TRANSPORTS = available_transports()
# Transports whose receiver sees the bytes arrive (shm's sender copies behind its back).
STREAMING = [name for name in TRANSPORTS if name != "shm"]

BLOCK = 64 << 10
BLOCKS = 32
FILL = 0x5A


# -- coalesce --------------------------------------------------------------------------------


def test_coalesce_merges_runs_consecutive_on_both_sides() -> None:
    assert coalesce([3, 4, 5, 9], [10, 11, 12, 2]) == [CopyRun(3, 10, 3), CopyRun(9, 2, 1)]
    assert coalesce([0, 1, 2, 3], [7, 8, 20, 21]) == [CopyRun(0, 7, 2), CopyRun(2, 20, 2)]
    assert coalesce([5, 4], [1, 2]) == [CopyRun(5, 1, 1), CopyRun(4, 2, 1)]
    assert coalesce([], []) == []


def test_coalesce_validates() -> None:
    with pytest.raises(ValueError, match="2 source blocks but 1"):
        coalesce([1, 2], [1])
    with pytest.raises(ValueError, match="negative"):
        coalesce([-1], [0])


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=40))
def test_coalesce_expands_back_to_the_pairs(pairs: list[tuple[int, int]]) -> None:
    runs = coalesce([s for s, _ in pairs], [d for _, d in pairs])
    expanded = [(r.src_block + i, r.dst_block + i) for r in runs for i in range(r.num_blocks)]
    assert expanded == pairs
    for a, b in itertools.pairwise(runs):  # maximal: neighbours never continue
        assert (b.src_block, b.dst_block) != (
            a.src_block + a.num_blocks,
            a.dst_block + a.num_blocks,
        )


# -- wire header -----------------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)


@given(st.sampled_from(list(Kind)), u64, u64, u64, u64, u64, st.integers(0, 2**16 - 1))
def test_header_round_trips(
    kind: Kind, tid: int, dst: int, num: int, offset: int, nbytes: int, status: int
) -> None:
    header = Header(kind, tid, dst, num, offset, nbytes, status)
    packed = header.pack()
    assert len(packed) == HEADER_SIZE
    assert Header.unpack(packed) == header
    buffer = bytearray(HEADER_SIZE)
    header.pack_into(buffer)
    assert bytes(buffer) == packed


def test_header_rejects_foreign_bytes() -> None:
    packed = bytearray(Header(Kind.DATA, 1, 2, 3, 4, 5).pack())
    with pytest.raises(FrameError, match="header of 10 bytes"):
        Header.unpack(packed[:10])
    bad_magic = bytearray(packed)
    bad_magic[0] ^= 0xFF
    with pytest.raises(FrameError, match="magic"):
        Header.unpack(bad_magic)
    bad_kind = bytearray(packed)
    bad_kind[4] = 99
    with pytest.raises(FrameError, match="kind 99"):
        Header.unpack(bad_kind)


# -- registry --------------------------------------------------------------------------------


def test_registry() -> None:
    assert TRANSPORTS[:2] == ["shm", "tcp"]
    with pytest.raises(ValueError, match="known: shm, tcp, ucx"):
        make_transport("rdma", HostRegion(BLOCK, 2))
    region = ShmRegion.create(BLOCK, 2)
    try:
        receiver, sender = make_transport("tcp", region)
        assert isinstance(receiver, TcpReceiver) and isinstance(sender, TcpSender)
        receiver, sender = make_transport("shm", region, sender_options={"retries": 0})
        assert isinstance(receiver, ShmReceiver) and isinstance(sender, ShmSender)
        assert sender.retries == 0
    finally:
        region.close()


def test_shm_receiver_needs_a_shared_region() -> None:
    with pytest.raises(TypeError, match="ShmRegion"):
        ShmReceiver(HostRegion(BLOCK, 2))


# -- receiver behaviour, in one process ------------------------------------------------------


@pytest.fixture
def src() -> Any:
    region = ShmRegion.create(BLOCK, BLOCKS)
    region.array[:] = np.random.default_rng(1).integers(0, 256, region.array.size, np.uint8)
    yield region
    region.close()


@pytest.fixture
def dst() -> Any:
    region = ShmRegion.create(BLOCK, BLOCKS)
    region.array.fill(FILL)
    yield region
    region.close()


@contextlib.asynccontextmanager
async def opened(
    name: str, region: ShmRegion, **sender_options: Any
) -> AsyncIterator[tuple[Receiver, Sender, dict[str, str]]]:
    receiver, sender = make_transport(name, region, sender_options=sender_options)
    endpoint = await receiver.start()
    try:
        yield receiver, sender, endpoint
    finally:
        await sender.close()
        await receiver.close()


def untouched(region: ShmRegion, first: int, count: int = 1) -> bool:
    return bool((region.array[first * BLOCK : (first + count) * BLOCK] == FILL).all())


@pytest.mark.parametrize("name", STREAMING)
async def test_round_trip_in_process(name: str, src: ShmRegion, dst: ShmRegion) -> None:
    runs = coalesce([3, 4, 5, 9], [10, 11, 12, 2])
    async with opened(name, dst) as (receiver, sender, endpoint):
        receiver.expect(7, [(r.dst_block, r.num_blocks) for r in runs])
        crc = await sender.send(endpoint, 7, src, runs, timeout_s=10, checksum=True)
        assert crc == zlib.crc32(bytes(src.blocks(3, 3)) + bytes(src.blocks(9)))
        assert await receiver.wait_complete(7, 10, crc) == 4 * BLOCK
        assert bytes(dst.blocks(10, 3)) == bytes(src.blocks(3, 3))
        assert bytes(dst.blocks(2)) == bytes(src.blocks(9))
        assert untouched(dst, 13) and untouched(dst, 1)
        # The transfer is over: its id is unknown again.
        with pytest.raises(TransferError, match="already completed"):
            await receiver.wait_complete(7, 1)


@pytest.mark.parametrize("name", STREAMING)
async def test_corrupted_checksum(name: str, src: ShmRegion, dst: ShmRegion) -> None:
    runs = [CopyRun(0, 0, 4)]
    async with opened(name, dst) as (receiver, sender, endpoint):
        receiver.expect(1, [(0, 4)])
        crc = await sender.send(endpoint, 1, src, runs, timeout_s=10, checksum=True)
        assert crc is not None
        with pytest.raises(ChecksumMismatch):
            await receiver.wait_complete(1, 10, crc ^ 1)


@pytest.mark.parametrize("name", TRANSPORTS)
async def test_wait_on_unknown_id(name: str, dst: ShmRegion) -> None:
    receiver, sender = make_transport(name, dst)
    await receiver.start()
    try:
        with pytest.raises(TransferError, match="not expected"):
            await receiver.wait_complete(12345, 1.0)
        receiver.cancel(12345)  # unknown ids are ignored
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.parametrize("name", TRANSPORTS)
async def test_expect_validates_runs(name: str, dst: ShmRegion) -> None:
    receiver, sender = make_transport(name, dst)
    await receiver.start()
    try:
        with pytest.raises(ValueError, match="outside"):
            receiver.expect(1, [(BLOCKS - 1, 2)])
        receiver.expect(2, [(0, 1)])
        with pytest.raises(ValueError, match="already expected"):
            receiver.expect(2, [(3, 1)])
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.parametrize("name", STREAMING)
async def test_sender_that_never_sends_times_out(name: str, dst: ShmRegion) -> None:
    async with opened(name, dst) as (receiver, _, _endpoint):
        receiver.expect(3, [(0, 2)])
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="0 of 131072 bytes"):
            await receiver.wait_complete(3, 0.3)
        assert 0.3 <= time.monotonic() - start < 2.3
        receiver.cancel(3)
        with pytest.raises(TransferError, match="cancelled"):
            await receiver.wait_complete(3, 0.3)


@pytest.mark.parametrize("name", STREAMING)
async def test_data_after_cancel_is_discarded(name: str, src: ShmRegion, dst: ShmRegion) -> None:
    async with opened(name, dst) as (receiver, sender, endpoint):
        receiver.expect(4, [(5, 3)])
        receiver.cancel(4)
        with pytest.raises(TransferError, match="CANCELLED"):
            await sender.send(endpoint, 4, src, [CopyRun(0, 5, 3)], timeout_s=10)
        assert untouched(dst, 0, BLOCKS)
        with pytest.raises(TransferError, match="cancelled"):
            await receiver.wait_complete(4, 1)
        # The sender's connection stays usable for the next transfer.
        receiver.expect(5, [(5, 3)])
        await sender.send(endpoint, 5, src, [CopyRun(0, 5, 3)], timeout_s=10)
        assert await receiver.wait_complete(5, 10) == 3 * BLOCK


async def test_shm_cancel_and_completion(dst: ShmRegion) -> None:
    receiver = ShmReceiver(dst)
    endpoint = await receiver.start()
    assert endpoint == {
        "shm": dst.name,
        "shm.block_bytes": str(BLOCK),
        "shm.max_blocks": str(BLOCKS),
    }
    receiver.expect(1, [(0, 2), (7, 1)])
    # shm completion is the commit itself: the byte count comes back at once.
    assert await receiver.wait_complete(1, 0.1) == 3 * BLOCK
    receiver.expect(2, [(0, 2)])
    with pytest.raises(ChecksumMismatch):
        await receiver.wait_complete(2, 1, zlib.crc32(bytes(dst.blocks(0, 2))) ^ 1)
    receiver.expect(3, [(0, 2)])
    assert await receiver.wait_complete(3, 1, zlib.crc32(bytes(dst.blocks(0, 2)))) == 2 * BLOCK
    receiver.expect(4, [(0, 1)])
    receiver.cancel(4)
    with pytest.raises(TransferError, match="cancelled"):
        await receiver.wait_complete(4, 1)
    await receiver.close()


# -- tcp specifics, driven by a hand-written peer --------------------------------------------


def raw_connect(endpoint: dict[str, str]) -> socket.socket:
    """A hand-written member peer: connected and through the handshake."""
    host, port = endpoint["tcp"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    shake_hands(sock)
    return sock


def shake_hands(sock: socket.socket, key: bytes | None = None) -> None:
    """The sender's half of the data-plane handshake over `sock` (this process's key by
    default); raises HandshakeError when the receiver does not prove it."""
    initiator = Initiator(key or data_plane_key(), "tcp")
    sock.sendall(initiator.hello())
    challenge = bytearray()
    while len(challenge) < CHALLENGE_SIZE:
        part = sock.recv(CHALLENGE_SIZE - len(challenge))
        assert part, "receiver closed the connection during the handshake"
        challenge += part
    sock.sendall(initiator.proof(bytes(challenge)))


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        part = sock.recv(size - len(buf))
        assert part, "peer closed the connection"
        buf += part
    return bytes(buf)


def fin(sock: socket.socket, tid: int) -> Header:
    sock.sendall(Header(Kind.FIN, tid).pack())
    buf = bytearray()
    while len(buf) < HEADER_SIZE:
        part = sock.recv(HEADER_SIZE - len(buf))
        assert part, "receiver closed the connection"
        buf += part
    return Header.unpack(buf)


def data(tid: int, dst_block: int, num_blocks: int, offset: int, payload: bytes) -> bytes:
    return Header(Kind.DATA, tid, dst_block, num_blocks, offset, len(payload)).pack() + payload


async def test_tcp_discards_data_it_does_not_expect(dst: ShmRegion) -> None:
    async with opened("tcp", dst) as (receiver, _, endpoint):
        receiver.expect(1, [(4, 2)])
        with raw_connect(endpoint) as sock:
            sock.sendall(data(99, 4, 2, 0, b"\x01" * BLOCK))  # unknown transfer
            sock.sendall(data(1, 6, 1, 0, b"\x02" * BLOCK))  # outside the expected blocks
            sock.sendall(data(1, 3, 2, 0, b"\x03" * 2 * BLOCK))  # straddles block 3
            sock.sendall(data(1, 4, 1, BLOCK // 2, b"\x04" * BLOCK))  # past its own run
            assert fin(sock, 99).status == AckStatus.UNKNOWN
            ack = fin(sock, 1)
            assert (ack.status, ack.nbytes) == (AckStatus.INCOMPLETE, 0)
        assert untouched(dst, 0, BLOCKS)


async def test_tcp_counts_bytes_once_whatever_the_chunking(dst: ShmRegion) -> None:
    """Chunks are judged by the bytes they cover: a resent or overlapping chunk counts once,
    and sender runs may split the receiver's expected runs differently."""
    async with opened("tcp", dst) as (receiver, _, endpoint):
        receiver.expect(1, [(4, 2)])
        with raw_connect(endpoint) as sock:
            sock.sendall(data(1, 4, 1, 0, b"\x07" * BLOCK))  # a run of its own
            sock.sendall(data(1, 4, 1, 0, b"\x07" * BLOCK))  # resent
            sock.sendall(data(1, 4, 2, BLOCK // 2, b"\x07" * BLOCK))  # overlaps half of it
            ack = fin(sock, 1)
            assert (ack.status, ack.nbytes) == (AckStatus.INCOMPLETE, BLOCK + BLOCK // 2)
            sock.sendall(data(1, 5, 1, BLOCK // 2, b"\x08" * (BLOCK // 2)))
            ack = fin(sock, 1)
            assert (ack.status, ack.nbytes) == (AckStatus.COMPLETE, 2 * BLOCK)
        assert await receiver.wait_complete(1, 5) == 2 * BLOCK
        assert bytes(dst.blocks(4, 2)) == b"\x07" * (BLOCK + BLOCK // 2) + b"\x08" * (BLOCK // 2)


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 20)), max_size=30))
def test_coverage_counts_each_byte_once(ranges: list[tuple[int, int]]) -> None:
    coverage, model = Coverage(), set()
    for start, length in ranges:
        new = set(range(start, start + length)) - model
        assert coverage.covers(start, start + length) == (not new)
        assert coverage.add(start, start + length) == len(new)
        model |= new
    assert sum(e - s for s, e in zip(coverage.starts, coverage.ends, strict=True)) == len(model)
    assert all(e < s for e, s in zip(coverage.ends, coverage.starts[1:], strict=False))


async def test_tcp_cancel_stops_a_chunk_in_flight(dst: ShmRegion) -> None:
    """cancel() while a chunk is half-received: nothing lands after cancel returns."""
    async with opened("tcp", dst) as (receiver, _, endpoint):
        receiver.expect(1, [(4, 2)])
        with raw_connect(endpoint) as sock:
            sock.sendall(Header(Kind.DATA, 1, 4, 2, 0, 2 * BLOCK).pack())
            sock.sendall(b"\x09" * 1000)
            deadline = time.monotonic() + 5
            while dst.array[4 * BLOCK + 999] != 9:  # the receiver is inside recv_into
                assert time.monotonic() < deadline
                await asyncio.sleep(0.001)
            receiver.cancel(1)
            snapshot = bytes(dst.blocks(0, BLOCKS))
            with contextlib.suppress(OSError):
                sock.sendall(b"\x0a" * (2 * BLOCK - 1000))
            await asyncio.sleep(0.1)
        assert bytes(dst.blocks(0, BLOCKS)) == snapshot
        assert untouched(dst, 5)
        with pytest.raises(TransferError, match="cancelled"):
            await receiver.wait_complete(1, 1)


async def test_tcp_sender_gives_up_on_an_unreachable_peer(src: ShmRegion) -> None:
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = TcpSender(retries=2)
    start = time.monotonic()
    with pytest.raises(TransferError, match=f"127.0.0.1:{port} failed after 3 attempts"):
        await sender.send({"tcp": f"127.0.0.1:{port}"}, 1, src, [CopyRun(0, 0, 1)], timeout_s=5)
    assert time.monotonic() - start < 5
    await sender.close()


async def test_tcp_sender_times_out_on_a_peer_that_stops_reading() -> None:
    """A member peer that accepts, shakes hands, then never reads: send fails by its
    timeout, never hangs."""
    big = ShmRegion.create(1 << 20, 48)  # more than both sides' socket buffers hold
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept_and_stall() -> None:
        conn, _ = listener.accept()
        held.append(conn)
        responder = Responder(data_plane_key(), "tcp")
        conn.sendall(responder.challenge(recv_exactly(conn, HELLO_SIZE)))
        responder.verify(recv_exactly(conn, PROOF_SIZE))

    stall = threading.Thread(target=accept_and_stall, daemon=True)
    stall.start()
    sender = TcpSender(retries=1)
    try:
        endpoint = {"tcp": f"127.0.0.1:{listener.getsockname()[1]}"}
        start = time.monotonic()
        with pytest.raises(TransferTimeout, match="timed out"):
            await sender.send(endpoint, 1, big, [CopyRun(0, 0, 48)], timeout_s=1.0)
        assert time.monotonic() - start < 1.0 + 2.0
    finally:
        await sender.close()
        stall.join(5)
        for conn in held:
            conn.close()
        listener.close()
        big.close()


async def test_tcp_sender_reconnects_to_a_restarted_receiver(
    src: ShmRegion, dst: ShmRegion
) -> None:
    receiver = TcpReceiver(dst)
    endpoint = await receiver.start()
    sender = TcpSender(retries=0)  # the stale connection must be noticed, not retried
    try:
        receiver.expect(1, [(0, 1)])
        await sender.send(endpoint, 1, src, [CopyRun(0, 0, 1)], timeout_s=5)
        await receiver.close()
        receiver = TcpReceiver(dst, port=receiver.port)
        assert await receiver.start() == endpoint
        receiver.expect(2, [(1, 1)])
        await sender.send(endpoint, 2, src, [CopyRun(1, 1, 1)], timeout_s=5)
        assert await receiver.wait_complete(2, 5) == BLOCK
        assert bytes(dst.blocks(0, 2)) == bytes(src.blocks(0, 2))
    finally:
        await sender.close()
        await receiver.close()


@pytest.mark.skipif("ucx" not in TRANSPORTS, reason="ucxx does not import here")
async def test_ucx_cancel_stops_a_chunk_in_flight(dst: ShmRegion) -> None:
    """cancel() while the receiver has a payload receive posted into the region: the
    payload that arrives afterwards does not land."""
    import ucxx

    from services.mempool.transport.ucx import UcxReceiver

    receiver = UcxReceiver(dst)
    endpoint = await receiver.start()
    host, port = endpoint["ucx"].rsplit(":", 1)
    ep = await ucxx.create_endpoint(host, int(port))
    try:
        initiator = Initiator(data_plane_key(), "ucx")
        await ep.send(np.frombuffer(bytearray(initiator.hello()), dtype=np.uint8))
        challenge = np.empty(CHALLENGE_SIZE, dtype=np.uint8)
        await ep.recv(challenge)
        proof = initiator.proof(challenge.tobytes())
        await ep.send(np.frombuffer(bytearray(proof), dtype=np.uint8))
        receiver.expect(1, [(4, 2)])
        header = Header(Kind.DATA, 1, 4, 2, 0, 2 * BLOCK).pack()
        await ep.send(np.frombuffer(bytearray(header), dtype=np.uint8))
        table = receiver._table  # white-box: wait until the payload receive is posted
        assert table is not None
        deadline = time.monotonic() + 5
        while not table._active[1].writers:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        receiver.cancel(1)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ep.send(np.full(2 * BLOCK, 9, dtype=np.uint8)), 2)
        await asyncio.sleep(0.1)
        assert untouched(dst, 0, BLOCKS)
        with pytest.raises(TransferError, match="cancelled"):
            await receiver.wait_complete(1, 1)
    finally:
        ep.abort()
        await receiver.close()
