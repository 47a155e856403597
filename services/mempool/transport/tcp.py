"""TCP transport: blocking sockets in threads, zero-copy on both ends.

Wire: the frames of `frame.py` over one TCP stream. The sender writes each chunk as
header + payload with `sendmsg`/`sendall` straight from memoryviews of its region; the
receiver reads the header, asks the `TransferTable` where the payload may go, and
`recv_into`s it directly into the destination region (or into a scratch buffer that is then
dropped). A send ends with FIN; the receiver answers ACK once every earlier chunk of the
connection is processed, so `send` returning means the peer holds every byte (or the peer
said why not, e.g. the transfer was cancelled).

Authentication: every connection starts with the mutual handshake of `handshake.py`
(HELLO, CHALLENGE, PROOF) under the receiver's `header_timeout_s`. The sender writes no frame
before the receiver has proven the cluster key (a listener that is not a member gets the
48-byte greeting and nothing else: `PeerNotMember`, no retry); the receiver reads no frame
header before the sender has proven it (a failed handshake closes the connection at once,
with a throttled warning).

Threads and who writes what:
- Receiver: one accept thread, one thread per connection. Only a connection thread holding
  a `Claim` writes into the region, and only into that claim's chunk. Connections are
  bounded, so threads are: at most `max_connections` at a time, `max_connections_per_host`
  from one peer host; the accept thread closes one over either limit at once, before it
  costs a thread. A connection must complete the handshake within `header_timeout_s` of
  being accepted, then deliver each frame header within `between_frames_timeout_s` of the
  previous frame, so idle connections do not hold their slot; the sender's cached
  connection is then found closed and replaced.
- Sender: the blocking send of a transfer runs in the sender's thread pool; it only reads the
  source region. One connection per peer, used by one transfer at a time (a per-peer lock);
  a stale or failed connection is replaced. Every blocking call has a kernel timeout
  (SO_SNDTIMEO/SO_RCVTIMEO, set per chunk) bounded by the transfer's deadline and by
  `stall_timeout_s`, so a dead peer costs at most the timeout, never a hang. Kernel timeouts
  rather than Python socket timeouts: the latter poll() before every send/recv (~10% of the
  throughput on loopback). The receiver's connections likewise drop when a payload stalls
  for `idle_timeout_s`, or a header for `between_frames_timeout_s`; the sender notices a closed
  cached connection before reusing it.

Cancellation: `TcpReceiver.cancel` deactivates the transfer, shuts down the connections that
are in the middle of writing one of its chunks (which wakes their `recv_into`), and waits
until they have let go of the region (microseconds; it raises TransferError, "do not reuse",
if a thread could not be scheduled within `cancel_wait_s`). When it returns no byte of the
transfer can land in the region any more, so D may free and reuse the blocks at once
(`cancel_fences_writes`). The sender whose connection was cut retries, and its resent data
is discarded; its FIN is answered with CANCELLED, so its `send` raises TransferError.

Retries: a transfer is resent from its first chunk on a new connection, since bytes written
to a socket that then failed may or may not have arrived; chunks that did arrive are
recognised by (dst_block, offset) and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from common.logging import Throttled, get_logger
from services.mempool.region import Region
from services.mempool.transport.base import (
    CopyRun,
    PeerNotMember,
    Sender,
    TransferError,
    TransferRejected,
    TransferTimeout,
    check_runs,
    run_blocking,
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
    HandshakeError,
    Initiator,
    Responder,
    resolve_key,
)
from services.mempool.transport.tracking import TrackedReceiver, TransferTable

log = get_logger(__name__)
_throttled = Throttled(log)

CHUNK_BYTES = 4 << 20
# Explicit SO_SNDBUF/SO_RCVBUF, or 0 to leave the kernel's autotuning on. Setting them turns
# autotuning off and is capped by net.core.{r,w}mem_max (4 MiB on the test machine), while
# autotuning grows the receive window up to tcp_rmem's maximum (32 MiB there): measured on
# loopback, autotuning was as fast for 16 MiB transfers and ~20% faster for 256 MiB.
SOCKET_BUFFER_BYTES = 0
_SCRATCH_BYTES = 1 << 20


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def _recv_exact(sock: socket.socket, view: memoryview) -> bool:
    """Fill `view` from `sock`; False if the peer closed the stream first."""
    got, size = 0, len(view)
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            return False
        got += n
    return True


def _discard(sock: socket.socket, nbytes: int, scratch: memoryview) -> bool:
    """Read and drop `nbytes`; False if the peer closed the stream first."""
    while nbytes > 0:
        n = sock.recv_into(scratch, min(nbytes, len(scratch)))
        if n == 0:
            return False
        nbytes -= n
    return True


def _recv_header(sock: socket.socket, view: memoryview, deadline: float) -> bool:
    """Fill `view` (a frame header) by `deadline` (monotonic); False if the peer closed the
    stream first. Raises TimeoutError past the deadline, however the bytes trickle in."""
    got, size = 0, len(view)
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete frame header in time")
        _kernel_timeout(sock, socket.SO_RCVTIMEO, left)
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            return False
        got += n
    return True


def _kernel_timeout(sock: socket.socket, option: int, seconds: float) -> None:
    """SO_RCVTIMEO/SO_SNDTIMEO: a blocking call waiting longer fails with EAGAIN (an OSError)."""
    whole, micros = divmod(max(1, round(seconds * 1e6)), 1_000_000)  # 0 would mean "never"
    sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("@ll", whole, micros))


def _tune(sock: socket.socket, buffer_bytes: int) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if buffer_bytes > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)


class TcpReceiver(TrackedReceiver):
    name = "tcp"
    cancel_fences_writes = True

    def __init__(
        self,
        region: Region,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        idle_timeout_s: float = 300.0,
        header_timeout_s: float = 5.0,
        between_frames_timeout_s: float | None = None,
        max_connections: int = 64,
        max_connections_per_host: int = 16,
        buffer_bytes: int = SOCKET_BUFFER_BYTES,
        cancel_wait_s: float = 5.0,
        key: bytes | None = None,
    ) -> None:
        if max_connections < 1 or max_connections_per_host < 1:
            raise ValueError("max_connections and max_connections_per_host must be >= 1")
        if header_timeout_s <= 0:
            raise ValueError(f"header_timeout_s must be > 0, got {header_timeout_s}")
        super().__init__(region)
        self.host = host
        self.port = port
        self.advertise_host = advertise_host or host
        self.idle_timeout_s = idle_timeout_s
        self.header_timeout_s = header_timeout_s
        # An authenticated connection may sit idle between frames this long (default: the
        # header deadline, as before); an unauthenticated one gets header_timeout_s in all.
        self.between_frames_timeout_s = between_frames_timeout_s or header_timeout_s
        self.max_connections = max_connections
        self.max_connections_per_host = max_connections_per_host
        self.buffer_bytes = buffer_bytes
        self.cancel_wait_s = cancel_wait_s
        self.refused_connections = 0  # closed at accept for being over a limit
        self.failed_handshakes = 0  # closed for not proving the cluster key
        self._key = key
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        # Under _conns_lock: the open connections, their threads, and how many per host.
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._per_host: dict[str, int] = {}
        self._conns_lock = threading.Lock()
        self._stopping = threading.Event()
        self._endpoint: dict[str, str] | None = None

    async def start(self) -> dict[str, str]:
        if self._endpoint is not None:
            return self._endpoint
        self._key = resolve_key(self._key)  # no key, no listener (SecurityError)
        self._start_table()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune(listener, self.buffer_bytes)  # accepted sockets inherit the options
        listener.bind((self.host, self.port))
        listener.listen(64)
        # Closing does shutdown() on the listener, which wakes accept() on Linux; the
        # timeout is the fallback that notices the stop flag elsewhere.
        listener.settimeout(1.0)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"tcp-rx-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()
        self._endpoint = {"tcp": f"{self.advertise_host}:{self.port}"}
        return self._endpoint

    def cancel(self, transfer_id: int) -> None:
        table = self._require_table()
        transfer, writers = table.cancel(transfer_id)
        if transfer is None or not writers:
            return
        for writer in writers:
            assert isinstance(writer, socket.socket)
            # Wakes the connection thread's recv_into; the thread then releases its claim.
            with contextlib.suppress(OSError):
                writer.shutdown(socket.SHUT_RDWR)
        # Blocks the loop for the time a woken thread needs to let go (microseconds); the
        # bound only matters if a thread cannot be scheduled at all.
        if not table.wait_writers(transfer, self.cancel_wait_s):
            raise TransferError(
                f"transfer {transfer_id}: a connection still writes its blocks "
                f"{self.cancel_wait_s:g}s after cancel; do not reuse them"
            )

    async def close(self) -> None:
        self._stopping.set()
        if self._table is not None:
            # Connection threads are shut down below, which also ends their claims.
            self._table.cancel_all()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        with self._conns_lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        threads = [thread for _, thread in conns]
        if self._accept_thread is not None:
            threads.append(self._accept_thread)
        await asyncio.to_thread(_join_all, threads)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._endpoint = None

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                break
            host = str(peer[0])
            thread = threading.Thread(
                target=self._serve, args=(conn, peer), name=f"tcp-rx-{peer}", daemon=True
            )
            with self._conns_lock:
                if self._stopping.is_set():
                    conn.close()
                    break
                over = self._over_limit(host)
                if not over:
                    self._conns[conn] = thread
                    self._per_host[host] = self._per_host.get(host, 0) + 1
            if over:
                # Closed before it costs a thread or a byte of buffer. Debug level: a flood
                # of refusals must not become a flood of log lines.
                self.refused_connections += 1
                log.debug("tcp receiver refused a connection", peer=str(peer), limit=over)
                conn.close()
                continue
            # Blocking socket with kernel receive timeouts: Python-level timeouts would
            # poll() before every recv, which costs ~10% of the throughput.
            conn.settimeout(None)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # prompt ACK frames
            thread.start()

    def _over_limit(self, host: str) -> str:
        """Which limit a new connection from `host` would exceed ("" if none); under
        `_conns_lock`."""
        if len(self._conns) >= self.max_connections:
            return "max_connections"
        if self._per_host.get(host, 0) >= self.max_connections_per_host:
            return "max_connections_per_host"
        return ""

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        table = self._require_table()
        header_buf = bytearray(HEADER_SIZE)
        header_view = memoryview(header_buf)
        scratch = memoryview(bytearray(_SCRATCH_BYTES))
        try:
            # The connection's first exchange, under the header deadline: a peer that does
            # not prove the key is closed before it can send a frame header, let alone claim
            # a byte of the region.
            if not self._authenticate(conn, peer):
                return
            while not self._stopping.is_set():
                wait = self.between_frames_timeout_s
                if not _recv_header(conn, header_view, time.monotonic() + wait):
                    break
                header = Header.unpack(header_buf)
                if header.kind is Kind.DATA:
                    if not self._receive_chunk(conn, table, header, scratch):
                        break
                elif header.kind is Kind.FIN:
                    status, received = table.fin_status(header.transfer_id)
                    ack = Header(Kind.ACK, header.transfer_id, nbytes=received, status=status)
                    conn.sendall(ack.pack())
                else:
                    raise FrameError(f"unexpected {header.kind.name} frame from a sender")
        except (OSError, FrameError) as e:
            if not self._stopping.is_set():
                log.debug("tcp receiver connection ended", peer=str(peer), error=str(e))
        finally:
            with self._conns_lock:
                self._conns.pop(conn, None)
                left = self._per_host[peer[0]] - 1
                if left:
                    self._per_host[peer[0]] = left
                else:
                    del self._per_host[peer[0]]
            conn.close()

    def _authenticate(self, conn: socket.socket, peer: tuple[str, int]) -> bool:
        """The responder's half of the handshake; False (after a throttled warning) when the
        peer did not prove the key within `header_timeout_s`."""
        assert self._key is not None
        deadline = time.monotonic() + self.header_timeout_s
        responder = Responder(self._key, "tcp")
        try:
            hello = bytearray(HELLO_SIZE)
            if not _recv_header(conn, memoryview(hello), deadline):
                raise HandshakeError("closed before its greeting")
            _kernel_timeout(conn, socket.SO_SNDTIMEO, max(0.001, deadline - time.monotonic()))
            conn.sendall(responder.challenge(bytes(hello)))
            proof = bytearray(PROOF_SIZE)
            if not _recv_header(conn, memoryview(proof), deadline):
                raise HandshakeError("closed before its proof")
            responder.verify(bytes(proof))
            return True
        except (HandshakeError, OSError) as e:
            if self._stopping.is_set():
                return False
            with self._conns_lock:  # connection threads count concurrently
                self.failed_handshakes += 1
            # SO_RCVTIMEO expiring is EAGAIN (BlockingIOError), not TimeoutError.
            timed_out = isinstance(e, TimeoutError | BlockingIOError)
            why = "no handshake in time" if timed_out else str(e)
            _throttled.warning(
                "tcp-handshake",
                "tcp data-plane peer failed the handshake",
                peer=str(peer),
                error=why,
            )
            return False

    def _receive_chunk(
        self, conn: socket.socket, table: TransferTable, header: Header, scratch: memoryview
    ) -> bool:
        # The payload follows its header at once; it may stall for up to idle_timeout_s.
        _kernel_timeout(conn, socket.SO_RCVTIMEO, self.idle_timeout_s)
        claim = table.claim(header, conn)
        if claim is None:
            return _discard(conn, header.nbytes, scratch)
        received = False
        try:
            received = _recv_exact(conn, claim.view)
        finally:
            table.release(claim, received)
        return received


def _join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()


@dataclass(eq=False)
class _Peer:
    """The cached connection to one receiver; `lock` serialises transfers on it."""

    address: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    sock: socket.socket | None = None


class TcpSender(Sender):
    name = "tcp"

    def __init__(
        self,
        retries: int = 2,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        connect_timeout_s: float = 5.0,
        stall_timeout_s: float = 30.0,
        buffer_bytes: int = SOCKET_BUFFER_BYTES,
        max_concurrent: int = 8,
        key: bytes | None = None,
    ) -> None:
        super().__init__(retries)
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.chunk_bytes = chunk_bytes
        self.connect_timeout_s = connect_timeout_s
        self.stall_timeout_s = stall_timeout_s
        self.buffer_bytes = buffer_bytes
        self._key = key
        self._peers: dict[str, _Peer] = {}
        self._peers_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="tcp-tx")
        self._closed = threading.Event()

    async def send(
        self,
        endpoint: Mapping[str, str],
        transfer_id: int,
        src: Region,
        runs: Sequence[CopyRun],
        *,
        timeout_s: float,
        checksum: bool = False,
    ) -> int | None:
        if self._closed.is_set():
            raise TransferError("the tcp sender is closed")
        address = endpoint.get("tcp")
        if address is None:
            raise ValueError(f"endpoint {dict(endpoint)} has no tcp address")
        check_runs(src, [(run.src_block, run.num_blocks) for run in runs], "source")
        self._key = resolve_key(self._key)  # no key, no transfer (SecurityError)
        deadline = time.monotonic() + timeout_s
        abandon = threading.Event()
        return await run_blocking(
            self._executor,
            self._send_blocking,
            address,
            transfer_id,
            src,
            list(runs),
            deadline,
            checksum,
            abandon,
            timeout_s=timeout_s,
            abandon=abandon,
            what=f"tcp transfer {transfer_id} to {address}",
        )

    async def close(self) -> None:
        self._closed.set()
        with self._peers_lock:
            peers = list(self._peers.values())
        for peer in peers:
            sock = peer.sock
            if sock is not None:
                # Wakes a sending thread; the thread closes the socket under the peer lock.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        await asyncio.to_thread(self._executor.shutdown, True)
        for peer in peers:
            if peer.sock is not None:
                peer.sock.close()
                peer.sock = None

    # -- blocking side ---------------------------------------------------------------------

    def _peer(self, address: str) -> _Peer:
        with self._peers_lock:
            peer = self._peers.get(address)
            if peer is None:
                peer = self._peers[address] = _Peer(address)
            return peer

    def _send_blocking(
        self,
        address: str,
        transfer_id: int,
        src: Region,
        runs: list[CopyRun],
        deadline: float,
        checksum: bool,
        abandon: threading.Event,
    ) -> int | None:
        peer = self._peer(address)
        attempts = self.retries + 1
        last_error: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                # Short backoff: enough for a restarting peer, well inside any deadline.
                time.sleep(min(0.05 * 2**attempt, max(0.0, deadline - time.monotonic())))
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not peer.lock.acquire(timeout=left):
                break
            try:
                sock = self._connection(peer, deadline)
                crc = self._stream(sock, peer, transfer_id, src, runs, deadline, checksum, abandon)
                return crc if checksum else None
            except HandshakeError as e:
                self._drop(peer)
                raise PeerNotMember(
                    f"data-plane peer tcp://{address} is not a cluster member: {e}"
                ) from None
            except (OSError, FrameError) as e:
                last_error = e
                self._drop(peer)
                if self._closed.is_set() or abandon.is_set():
                    raise TransferError(
                        f"tcp transfer {transfer_id} to {address} abandoned: {e}"
                    ) from e
            finally:
                peer.lock.release()
        if time.monotonic() >= deadline:
            raise TransferTimeout(
                f"tcp transfer {transfer_id} to {address} timed out (last error: {last_error})"
            )
        raise TransferError(
            f"tcp transfer {transfer_id} to {address} failed after {attempts} attempts: "
            f"{last_error}"
        ) from last_error

    def _connection(self, peer: _Peer, deadline: float) -> socket.socket:
        if peer.sock is not None and _alive(peer.sock):
            return peer.sock
        self._drop(peer)
        host, port = parse_address(peer.address)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            _tune(sock, self.buffer_bytes)  # before connect, so the window scale fits
            sock.settimeout(max(0.001, min(self.connect_timeout_s, deadline - time.monotonic())))
            sock.connect((host, port))
            # From here on blocking, with kernel timeouts set per operation (see _op_timeout).
            sock.settimeout(None)
            self._handshake(sock, min(deadline, time.monotonic() + self.connect_timeout_s))
        except (OSError, HandshakeError):
            sock.close()
            raise
        peer.sock = sock
        return sock

    def _handshake(self, sock: socket.socket, deadline: float) -> None:
        """The initiator's half: nothing but HELLO and PROOF is written before the receiver
        proved the key. A receiver that closes first (e.g. over its connection limit)
        raises ConnectionResetError (retried); a wrong or missing answer HandshakeError."""
        assert self._key is not None
        initiator = Initiator(self._key, "tcp")
        _kernel_timeout(sock, socket.SO_SNDTIMEO, max(0.001, deadline - time.monotonic()))
        sock.sendall(initiator.hello())
        challenge = bytearray(CHALLENGE_SIZE)
        try:
            if not _recv_header(sock, memoryview(challenge), deadline):
                raise ConnectionResetError("receiver closed the connection during the handshake")
        except (TimeoutError, BlockingIOError):
            raise HandshakeError("no answer to the handshake in time") from None
        sock.sendall(initiator.proof(bytes(challenge)))

    def _drop(self, peer: _Peer) -> None:
        if peer.sock is not None:
            peer.sock.close()
            peer.sock = None

    def _op_timeout(self, deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("transfer deadline passed")
        return min(left, self.stall_timeout_s)

    def _stream(
        self,
        sock: socket.socket,
        peer: _Peer,
        transfer_id: int,
        src: Region,
        runs: list[CopyRun],
        deadline: float,
        checksum: bool,
        abandon: threading.Event,
    ) -> int:
        crc = 0
        total = 0
        for run in runs:
            view = src.blocks(run.src_block, run.num_blocks)
            try:
                for offset in range(0, len(view), self.chunk_bytes):
                    if abandon.is_set() or self._closed.is_set():
                        raise OSError("transfer abandoned")
                    with view[offset : offset + self.chunk_bytes] as piece:
                        header = Header(
                            Kind.DATA,
                            transfer_id,
                            run.dst_block,
                            run.num_blocks,
                            offset,
                            len(piece),
                        ).pack()
                        _kernel_timeout(sock, socket.SO_SNDTIMEO, self._op_timeout(deadline))
                        _send_frame(sock, header, piece)
                        if checksum:
                            crc = zlib.crc32(piece, crc)
                        total += len(piece)
            finally:
                # A traceback may outlive this frame; released views keep no export of the
                # source region's memory, so the region can still be closed.
                view.release()
        timeout = self._op_timeout(deadline)
        _kernel_timeout(sock, socket.SO_SNDTIMEO, timeout)
        _kernel_timeout(sock, socket.SO_RCVTIMEO, timeout)
        sock.sendall(Header(Kind.FIN, transfer_id, nbytes=total).pack())
        ack_buf = bytearray(HEADER_SIZE)
        if not _recv_exact(sock, memoryview(ack_buf)):
            raise ConnectionResetError("receiver closed the connection before acknowledging")
        ack = Header.unpack(ack_buf)
        if ack.kind is not Kind.ACK or ack.transfer_id != transfer_id:
            raise FrameError(f"expected ACK of transfer {transfer_id}, got {ack}")
        if ack.status != AckStatus.COMPLETE:
            raise TransferRejected(
                f"tcp transfer {transfer_id} to {peer.address}: receiver reports "
                f"{AckStatus(ack.status).name} ({ack.nbytes} of {total} bytes)"
            )
        return crc


def _send_frame(sock: socket.socket, header: bytes, payload: memoryview) -> None:
    """Header and payload in one syscall where the kernel takes it all (it usually does)."""
    sent = sock.sendmsg([header, payload])
    if sent < len(header):
        sock.sendall(memoryview(header)[sent:])
        sent = len(header)
    if sent - len(header) < len(payload):
        sock.sendall(payload[sent - len(header) :])


def _alive(sock: socket.socket) -> bool:
    """False if the peer closed or reset a cached connection (checked without blocking)."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    # Returned without blocking: EOF (b""), or bytes nobody asked for. Either way the
    # stream is not usable.
    return False
