"""The tcp receiver's connection limits, driven by raw TCP peers: connections over a limit
are closed at accept, idle ones after the header deadline, and real transfers still work."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import pytest

from services.mempool.config import MempoolConfig
from services.mempool.region import ShmRegion
from services.mempool.transport import CopyRun
from services.mempool.transport.frame import HEADER_SIZE, Header, Kind
from services.mempool.transport.tcp import TcpReceiver, TcpSender
from tests.mempool.regions import BLOCK, WAIT_S


def connect_from(endpoint: dict[str, str], source: str = "127.0.0.1") -> socket.socket:
    """A raw peer from `source` (any 127/8 address is loopback on Linux)."""
    host, port = endpoint["tcp"].rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5, source_address=(source, 0))
    sock.settimeout(None)  # blocking, so MSG_DONTWAIT peeks answer at once
    return sock


def closed_by_receiver(sock: socket.socket) -> bool:
    """Whether the receiver has closed `sock` (checked without waiting)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


async def eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def connection_threads() -> int:
    return sum(
        1
        for t in threading.enumerate()
        if t.name.startswith("tcp-rx-") and not t.name.startswith("tcp-rx-accept")
    )


async def test_connections_over_the_limits_are_closed_at_once(dst: ShmRegion) -> None:
    """With a header deadline far beyond the wait, only the limits can close connections:
    per host (3) first, then per listener (8), whatever the other hosts hold."""
    receiver = TcpReceiver(dst, header_timeout_s=600, max_connections=8, max_connections_per_host=3)
    endpoint = await receiver.start()
    peers: dict[str, list[socket.socket]] = {}
    try:
        for source, count in (("127.0.0.1", 5), ("127.0.0.2", 3), ("127.0.0.3", 3)):
            peers[source] = [connect_from(endpoint, source) for _ in range(count)]
        every = [sock for socks in peers.values() for sock in socks]
        # 2 over the per-host limit from 127.0.0.1, 1 over the listener's from 127.0.0.3.
        assert await eventually(lambda: sum(map(closed_by_receiver, every)) == 3)
        open_per_host = {
            source: sum(not closed_by_receiver(s) for s in socks) for source, socks in peers.items()
        }
        assert open_per_host == {"127.0.0.1": 3, "127.0.0.2": 3, "127.0.0.3": 2}
        assert receiver.refused_connections == 3
        assert connection_threads() == 8
        # A slot freed by a peer that leaves is admitted again.
        peers["127.0.0.2"][0].close()
        assert await eventually(lambda: connection_threads() == 7)
        late = connect_from(endpoint, "127.0.0.4")
        every.append(late)
        assert await eventually(lambda: connection_threads() == 8)
        assert not closed_by_receiver(late)
    finally:
        for socks in peers.values():
            for sock in socks:
                sock.close()
        await receiver.close()
    assert connection_threads() == 0


async def test_idle_connections_are_closed_and_transfers_still_work(
    src: ShmRegion, dst: ShmRegion
) -> None:
    receiver = TcpReceiver(dst, header_timeout_s=0.3, max_connections=4, max_connections_per_host=4)
    endpoint = await receiver.start()
    sender = TcpSender(retries=2)
    baseline = connection_threads()
    idle = [connect_from(endpoint) for _ in range(6)]
    try:
        # Two are refused at once; the four admitted send nothing and time out.
        assert await eventually(lambda: all(map(closed_by_receiver, idle)))
        assert receiver.refused_connections == 2
        # The deadline covers the whole header: a peer trickling one byte at a time (the
        # whole trickle lasts 30 times the deadline) is closed before its header is done.
        with connect_from(endpoint) as slow:
            sent = 0
            for byte in Header(Kind.FIN, 1).pack()[: HEADER_SIZE - 1]:
                try:
                    if closed_by_receiver(slow):
                        break
                    slow.sendall(bytes([byte]))
                except ConnectionError:
                    break
                sent += 1
                await asyncio.sleep(0.2)
            assert sent < HEADER_SIZE - 1
            assert await eventually(lambda: closed_by_receiver(slow))
        assert await eventually(lambda: connection_threads() == baseline)
        # Positive control: a real transfer, and another after its connection went idle.
        receiver.expect(1, [(0, 2)])
        await sender.send(endpoint, 1, src, [CopyRun(0, 0, 2)], timeout_s=10)
        assert await receiver.wait_complete(1, 10) == 2 * BLOCK
        assert await eventually(lambda: connection_threads() == baseline)
        receiver.expect(2, [(2, 2)])
        await sender.send(endpoint, 2, src, [CopyRun(2, 2, 2)], timeout_s=10)
        assert await receiver.wait_complete(2, 10) == 2 * BLOCK
        assert bytes(dst.blocks(0, 4)) == bytes(src.blocks(0, 4))
    finally:
        for sock in idle:
            sock.close()
        await sender.close()
        await receiver.close()
    assert await eventually(lambda: connection_threads() == baseline)


def test_the_daemon_config_sets_the_limits() -> None:
    cfg = MempoolConfig(
        data_max_connections=10, data_max_connections_per_host=2, data_header_timeout_s=1.5
    ).validate()
    receiver = TcpReceiver(ShmRegion.create(BLOCK, 1), **cfg.tcp_receiver_options())
    try:
        assert (receiver.max_connections, receiver.max_connections_per_host) == (10, 2)
        assert receiver.header_timeout_s == 1.5
    finally:
        receiver.region.close()
    defaults = MempoolConfig()
    assert defaults.tcp_receiver_options() == {
        "max_connections": 64,
        "max_connections_per_host": 16,
        "header_timeout_s": 5.0,
        "between_frames_timeout_s": 30.0,
    }
    assert defaults.rpc_max_message_bytes() >= defaults.tensor_memory_bytes
    with pytest.raises(ValueError, match="data_max_connections"):
        MempoolConfig(data_max_connections_per_host=0).validate()
    with pytest.raises(ValueError, match="data_header_timeout_s"):
        MempoolConfig(data_header_timeout_s=0).validate()
