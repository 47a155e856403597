"""Data-plane authentication (issue 12): tcp, ucx and gloo transfers start with a mutual
handshake over the cluster key. A sender writes no region byte to a listener that is not a
member (KV exfiltration through `Transfer(dst=attacker)`); a listener takes no frame from a
peer that is not one; idle and excess connections are closed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from common.protocol import mempool as mp
from common.security import data_plane_key
from common.sockets import RpcServer
from services.mempool.region import ShmRegion
from services.mempool.transport import CopyRun, PeerNotMember, available_transports
from services.mempool.transport.frame import Header, Kind
from services.mempool.transport.handshake import (
    CHALLENGE_SIZE,
    HELLO_SIZE,
    MAGIC,
    Initiator,
    Responder,
)
from services.mempool.transport.tcp import TcpReceiver, TcpSender
from tests.daemons import Daemon, SpawnDaemon
from tests.mempool.regions import BLOCK, BLOCKS, WAIT_S

OTHER_KEY = os.urandom(32)


def untouched(region: ShmRegion) -> bool:
    return not region.array.any()


async def eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


class Attacker:
    """A plain TCP listener that records every byte each connection sends it. With
    `answer`, it plays a receiver holding another key (a well-formed but wrong answer)."""

    def __init__(self, answer: bool = False) -> None:
        self.answer = answer
        self.received: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._drain, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _drain(self, conn: socket.socket) -> None:
        got = bytearray()
        with conn:
            conn.settimeout(WAIT_S)
            try:
                while True:
                    part = conn.recv(1 << 16)
                    if not part:
                        break
                    got += part
                    if self.answer and len(got) == HELLO_SIZE:
                        conn.sendall(Responder(OTHER_KEY, "tcp").challenge(bytes(got)))
            except OSError:
                pass
        self.received.append(bytes(got))

    def close(self) -> list[bytes]:
        """Every connection's bytes, once each has ended."""
        self.listener.close()
        for thread in self._threads:
            thread.join(WAIT_S)
        return self.received


def only_greetings(received: list[bytes]) -> bool:
    return bool(received) and all(
        len(got) == HELLO_SIZE and got.startswith(MAGIC) for got in received
    )


@pytest.mark.parametrize("answer", [False, True], ids=["silent", "wrong-key"])
async def test_tcp_sender_sends_nothing_but_a_greeting_to_a_non_member(
    src: ShmRegion, answer: bool
) -> None:
    attacker = Attacker(answer)
    sender = TcpSender(retries=2, connect_timeout_s=0.5)
    try:
        with pytest.raises(PeerNotMember, match=f"tcp://{attacker.address} is not a cluster"):
            await sender.send({"tcp": attacker.address}, 1, src, [CopyRun(0, 0, 4)], timeout_s=10)
    finally:
        await sender.close()
    received = attacker.close()
    assert only_greetings(received), [len(r) for r in received]
    assert len(received) == 1  # failed at once: no retry


async def test_a_receiver_takes_no_frame_from_a_peer_without_the_key(dst: ShmRegion) -> None:
    """Skip the handshake, or fail it, then send a well-formed DATA frame for an expected
    transfer: the region stays untouched, and the connection is closed."""
    receiver = TcpReceiver(dst, header_timeout_s=5)
    endpoint = await receiver.start()
    host, port = endpoint["tcp"].rsplit(":", 1)
    frame = Header(Kind.DATA, 1, 0, 2, 0, 2 * BLOCK).pack() + b"\x07" * (2 * BLOCK)
    try:
        receiver.expect(1, [(0, 2)])
        # 1: a frame instead of a greeting.
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            with contextlib.suppress(ConnectionError):
                sock.sendall(frame)
            assert closed(sock)
        # 2: a greeting with another key; the receiver's answer cannot be verified, so the
        # attacker forges a proof and sends the frame anyway.
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            initiator = Initiator(OTHER_KEY, "tcp")
            sock.sendall(initiator.hello())
            assert len(recv_exactly(sock, CHALLENGE_SIZE)) == CHALLENGE_SIZE
            with contextlib.suppress(ConnectionError):
                sock.sendall(os.urandom(32) + frame)
            assert closed(sock)
        assert receiver.failed_handshakes == 2
        assert untouched(dst)
        # Positive control: a member's transfer lands, byte-exact.
        sender = TcpSender()
        src = ShmRegion.create(BLOCK, BLOCKS)
        try:
            src.array[:] = 9
            await sender.send(endpoint, 1, src, [CopyRun(0, 0, 2)], timeout_s=10)
            assert await receiver.wait_complete(1, 10) == 2 * BLOCK
            assert bytes(dst.blocks(0, 2)) == bytes(src.blocks(0, 2))
        finally:
            await sender.close()
            src.close()
    finally:
        await receiver.close()


async def test_idle_and_excess_connections_are_closed(dst: ShmRegion) -> None:
    """300 idle connections (the issue's flood) cost at most the limits' worth of threads,
    and all of them are closed by the handshake deadline; an authenticated connection that
    goes idle is closed by the idle deadline."""
    receiver = TcpReceiver(
        dst,
        header_timeout_s=0.5,
        between_frames_timeout_s=0.5,
        max_connections=64,
        max_connections_per_host=16,
    )
    endpoint = await receiver.start()
    host, port = endpoint["tcp"].rsplit(":", 1)
    flood: list[socket.socket] = []
    try:
        for _ in range(300):
            flood.append(socket.create_connection((host, int(port)), timeout=5))
        assert await eventually(lambda: all(map(closed, flood)))
        # Each one was either refused at accept (over a limit) or timed out the handshake.
        assert await eventually(
            lambda: receiver.refused_connections + receiver.failed_handshakes == 300
        )
        assert receiver.refused_connections > 0
        with socket.create_connection((host, int(port)), timeout=5) as member:
            initiator = Initiator(data_plane_key(), "tcp")
            member.sendall(initiator.hello())
            member.sendall(initiator.proof(recv_exactly(member, CHALLENGE_SIZE)))
            assert await eventually(lambda: closed(member))
    finally:
        for sock in flood:
            sock.close()
        await receiver.close()


def test_the_daemon_config_sets_the_idle_deadline() -> None:
    from services.mempool.config import MempoolConfig
    from services.mempool.data_plane import ucx_limits

    options = MempoolConfig(data_idle_timeout_s=7, data_header_timeout_s=2).tcp_receiver_options()
    assert options["between_frames_timeout_s"] == 7 and options["header_timeout_s"] == 2
    assert ucx_limits(options) == {
        "max_connections": 64,
        "handshake_timeout_s": 2,
        "idle_timeout_s": 7,
    }
    with pytest.raises(ValueError, match="data_idle_timeout_s"):
        MempoolConfig(data_idle_timeout_s=0).validate()


@pytest.mark.skipif("ucx" not in available_transports(), reason="ucxx does not import here")
async def test_ucx_refuses_a_receiver_with_another_key(src: ShmRegion, dst: ShmRegion) -> None:
    from services.mempool.transport.ucx import UcxReceiver, UcxSender

    stranger = UcxReceiver(dst, key=OTHER_KEY)
    endpoint = await stranger.start()
    sender = UcxSender(connect_timeout_s=2)
    try:
        stranger.expect(1, [(0, 4)])
        with pytest.raises(PeerNotMember, match="is not a cluster member"):
            await sender.send(endpoint, 1, src, [CopyRun(0, 0, 4)], timeout_s=10)
        assert untouched(dst)
        # And the other way round: a member receiver refuses the stranger's sender.
        member = UcxReceiver(dst)
        member_endpoint = await member.start()
        stranger_sender = UcxSender(connect_timeout_s=2, key=OTHER_KEY)
        try:
            member.expect(2, [(0, 4)])
            with pytest.raises(PeerNotMember):
                await stranger_sender.send(
                    member_endpoint, 2, src, [CopyRun(0, 0, 4)], timeout_s=10
                )
            assert untouched(dst)
        finally:
            await stranger_sender.close()
            await member.close()
    finally:
        await sender.close()
        await stranger.close()


async def test_gloo_refuses_a_receiver_with_another_key(src: ShmRegion, dst: ShmRegion) -> None:
    pytest.importorskip("torch")
    from services.mempool.transport.collective import GlooReceiver, GlooSender

    stranger = GlooReceiver(dst, key=OTHER_KEY, connect_timeout_s=1)
    endpoint = await stranger.start()
    sender = GlooSender(connect_timeout_s=2)
    try:
        stranger.expect(1, [(0, 4)])
        with pytest.raises(PeerNotMember, match="gloo://.* is not a cluster member"):
            await sender.send(endpoint, 1, src, [CopyRun(0, 0, 4)], timeout_s=10)
        assert untouched(dst)
        assert await eventually(lambda: stranger.failed_handshakes == 1)
    finally:
        await sender.close()
        await stranger.close()


# -- a real daemon told to send its KV to an attacker -----------------------------------------


async def test_daemon_transfer_to_an_attacker_listener_fails_and_leaks_nothing(
    spawn_daemon: SpawnDaemon,
) -> None:
    """A control-plane peer answers Prepare with an attacker's tcp listener as the endpoint:
    the daemon's Transfer fails with a clear error, the attacker receives the greeting and
    not one KV byte, and the daemon keeps its blocks intact."""
    a = await spawn_daemon("auth-a", transports=["tcp"])
    attacker = Attacker(answer=True)
    server = RpcServer("tcp://127.0.0.1:0", mp.MempoolRequest, mp.MempoolReply)
    aborted: list[int] = []

    async def fake_dst(req: Any) -> Any:
        if isinstance(req, mp.PrepareReceive):
            ids = list(range(req.num_blocks))
            return mp.Prepared(7, ids, "tcp", {"tcp": attacker.address})
        if isinstance(req, mp.AbortReceive):
            aborted.append(req.transfer_id)
        return mp.Ok()

    serving = asyncio.create_task(server.serve(fake_dst))
    try:
        blocks = await a.client.alloc_mem(4)
        with pytest.raises(Exception, match="is not a cluster member"):
            await a.client.transfer(server.address, blocks, [], transport="tcp", timeout_s=5)
        assert aborted == [7]
        await a.client.free_mem(blocks)
        await assert_intact(a)
    finally:
        server.close()
        await asyncio.wait_for(serving, 5)
    received = attacker.close()
    assert only_greetings(received), [len(r) for r in received]


async def assert_intact(d: Daemon) -> None:
    check = await d.client.check_integrity()
    assert check.ok, check.message
    st = await d.client.stats()
    assert st.client["device"] == 0 and st.pending_transfers == 0, st
    assert st.transfers_failed >= 1


# -- helpers --------------------------------------------------------------------------------


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        part = sock.recv(size - len(buf))
        assert part, "peer closed the connection"
        buf += part
    return bytes(buf)


def closed(sock: socket.socket) -> bool:
    """Whether the peer closed `sock`; waits up to WAIT_S for it to say so."""
    sock.settimeout(WAIT_S)
    try:
        while sock.recv(1 << 16):
            pass
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return True
