"""UCX transport (ucxx): the frames of `frame.py` as UCX tag messages, zero-copy.

Every frame is two messages on one endpoint: the 48-byte header (a small numpy array), then,
for DATA, the payload sent as a numpy view over the source region. The receiver reads the
header, asks the `TransferTable` where the payload may go, and posts the payload receive
directly on a numpy view of the destination region (or on scratch memory that is dropped).
UCX delivers messages of one endpoint in order, so header and payload pair up. A send ends
with FIN and waits for the receiver's ACK, as over tcp.

ucxx requires every call to be made on one event loop: the receiver's listener handlers,
`cancel`, and the sender all run on the daemon's loop (the loop that called `start` or the
first `send`). UCX itself is progressed from that loop too ("blocking" progress mode, see
`UCX_OPTIONS`), so no thread touches the region behind the loop's back.

Who writes what: UCX writes a payload into the region only into a buffer the receiver posted
for a `Claim` (an active transfer's expected, not-yet-received chunk), and only while the
loop progresses the worker. `cancel` runs on the loop: it deactivates the transfer (no
further claims) and aborts the endpoints that have a claimed receive in flight, which
cancels those receives before the loop progresses UCX again, so nothing more lands in the
transfer's blocks once it returns (`cancel_fences_writes`). The sender whose endpoint was
aborted reconnects, its resent data is discarded, and its FIN is answered with CANCELLED.
If the process initialised ucxx itself in "thread" progress mode, `abort` still waits (up to
`_ABORT_PERIOD_NS`) for the progress thread to close the endpoint.

Authentication and limits: an endpoint's first messages are the handshake of
`handshake.py` (HELLO, CHALLENGE, PROOF as three tag messages of fixed size), within the
receiver's `handshake_timeout_s`. The sender sends no frame before the receiver proved the
cluster key (`PeerNotMember` otherwise, no retry); the receiver posts no frame receive (so
UCX writes nothing into the region) before the sender proved it; a failed handshake aborts
the endpoint with a throttled warning. The receiver keeps at most `max_connections`
endpoints (one over is aborted at once) and aborts one that sends no frame header for
`idle_timeout_s`. Not covered: a per-host limit (ucxx does not tell the listener who
connected), and what UCX itself does before our handler runs (its connection setup and
peer-info exchange, bounded by ucxx's own connect timeout).

Timeouts are `asyncio.wait_for` around connecting and around each attempt; an attempt that
times out aborts its endpoint, which cancels its outstanding sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import ucxx
from ucxx.exceptions import UCXCanceled, UCXCloseError, UCXConnectionResetError, UCXError

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
)
from services.mempool.transport.frame import HEADER_SIZE, AckStatus, FrameError, Header, Kind
from services.mempool.transport.handshake import (
    CHALLENGE_SIZE,
    HELLO_SIZE,
    PROOF_SIZE,
    HandshakeError,
    Initiator,
    Responder,
    resolve_key,
)
from services.mempool.transport.tcp import parse_address
from services.mempool.transport.tracking import TrackedReceiver, TransferTable

log = get_logger(__name__)
_throttled = Throttled(log)

CHUNK_BYTES = 16 << 20
# A discarded payload is received into scratch memory of this size at most; a DATA frame
# announcing more is a protocol error (our senders never chunk beyond it).
MAX_CHUNK_BYTES = 256 << 20
# How long `Endpoint.abort` may wait for UCX's progress thread to close an endpoint (ns).
_ABORT_PERIOD_NS = 2 * 10**9

_FAILURES: tuple[type[BaseException], ...] = (UCXError, OSError, FrameError)


# UCX settings this transport is tuned for; the environment (UCX_*, UCXPY_PROGRESS_MODE)
# overrides them. "blocking" progress runs UCX from the event loop (woken by the worker's
# file descriptor) instead of ucxx's default progress thread, which contends with the
# interpreter for the GIL; with progress on the loop thread no UCX write can race `cancel`
# either. Larger TCP segments (default 8 KiB) cut per-message overhead on the tcp lanes.
# Measured between two processes on the 2-core test machine, 64 MiB transfers: 0.7 GiB/s
# with ucxx's defaults, 1.2 with either change alone, 4-4.5 with both.
UCX_OPTIONS = {"TCP_TX_SEG_SIZE": "1m", "TCP_RX_SEG_SIZE": "1m"}
PROGRESS_MODE = "blocking"


def _init_ucx() -> None:
    """Create ucxx's process-wide context with our settings, unless it already exists."""
    # RuntimeError: initialised before (by us or by the process); its settings stand.
    with contextlib.suppress(RuntimeError):
        ucxx.init(
            options=UCX_OPTIONS,
            env_takes_precedence=True,
            progress_mode=os.environ.get("UCXPY_PROGRESS_MODE", PROGRESS_MODE),
        )


def _array(data: bytes) -> np.ndarray:
    return np.frombuffer(bytearray(data), dtype=np.uint8)


def _header_array(header: Header) -> np.ndarray:
    return _array(header.pack())


class UcxReceiver(TrackedReceiver):
    name = "ucx"
    cancel_fences_writes = True

    def __init__(
        self,
        region: Region,
        *,
        port: int = 0,
        advertise_host: str = "127.0.0.1",
        max_connections: int = 64,
        handshake_timeout_s: float = 5.0,
        idle_timeout_s: float = 30.0,
        key: bytes | None = None,
    ) -> None:
        if max_connections < 1 or handshake_timeout_s <= 0 or idle_timeout_s <= 0:
            raise ValueError("max_connections >= 1 and positive timeouts, please")
        super().__init__(region)
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.refused_connections = 0
        self.failed_handshakes = 0
        self._key = key
        self.port = port
        self.advertise_host = advertise_host
        self._listener: Any = None
        self._endpoints: set[Any] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._scratch = np.empty(0, dtype=np.uint8)
        self._endpoint: dict[str, str] | None = None

    async def start(self) -> dict[str, str]:
        if self._endpoint is not None:
            return self._endpoint
        self._key = resolve_key(self._key)  # no key, no listener (SecurityError)
        self._start_table()
        _init_ucx()
        self._listener = ucxx.create_listener(self._on_connect, port=self.port)
        self.port = self._listener.port
        self._endpoint = {"ucx": f"{self.advertise_host}:{self.port}"}
        return self._endpoint

    def cancel(self, transfer_id: int) -> None:
        _, writers = self._require_table().cancel(transfer_id)
        for writer in writers:
            ep: Any = writer  # claims on this transport are registered by endpoint
            # The handler blocked in this endpoint's payload receive wakes with an error and
            # releases its claim; after abort returns UCX writes nothing more through it.
            ep.abort(period=_ABORT_PERIOD_NS)

    async def close(self) -> None:
        if self._table is not None:
            self._table.cancel_all()
        for ep in list(self._endpoints):
            ep.abort(period=_ABORT_PERIOD_NS)
        if self._handlers:
            # Aborted endpoints end their handlers; the listener goes after them.
            await asyncio.wait(set(self._handlers), timeout=5.0)
            await asyncio.sleep(0)  # ucxx's done-callbacks on those tasks run one turn later
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._endpoint = None

    async def _on_connect(self, ep: Any) -> None:
        if len(self._endpoints) >= self.max_connections:
            self.refused_connections += 1
            log.debug("ucx receiver refused a connection", limit="max_connections")
            ep.abort(period=_ABORT_PERIOD_NS)
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._endpoints.add(ep)
        try:
            if await self._authenticate(ep):
                await self._serve(ep)
        except TimeoutError:
            log.debug("ucx receiver closed an idle endpoint")
        except (UCXCanceled, UCXCloseError, UCXConnectionResetError):
            pass  # the sender closed its endpoint, or `cancel`/`close` aborted it
        except _FAILURES as e:
            log.warning("ucx receiver endpoint failed", error=str(e))
        finally:
            self._endpoints.discard(ep)
            self._handlers.discard(task)
            if not ep.closed:
                ep.abort(period=_ABORT_PERIOD_NS)

    async def _authenticate(self, ep: Any) -> bool:
        """The responder's half of the handshake within `handshake_timeout_s`; False (after
        a throttled warning) when the peer did not prove the key."""
        assert self._key is not None
        responder = Responder(self._key, "ucx")

        async def exchange() -> None:
            hello = np.empty(HELLO_SIZE, dtype=np.uint8)
            await ep.recv(hello)
            await ep.send(_array(responder.challenge(hello.tobytes())))
            proof = np.empty(PROOF_SIZE, dtype=np.uint8)
            await ep.recv(proof)
            responder.verify(proof.tobytes())

        try:
            await asyncio.wait_for(exchange(), self.handshake_timeout_s)
            return True
        except (HandshakeError, TimeoutError, UCXError, OSError, FrameError) as e:
            self.failed_handshakes += 1
            why = "no handshake in time" if isinstance(e, TimeoutError) else str(e)
            _throttled.warning(
                "ucx-handshake", "ucx data-plane peer failed the handshake", error=why
            )
            return False

    async def _serve(self, ep: Any) -> None:
        table = self._require_table()
        header_buf = np.empty(HEADER_SIZE, dtype=np.uint8)
        # `cancel` may abort this endpoint while a payload receive is pending; ucxx then
        # cannot be called on it any more, so check before every frame.
        while not ep.closed:
            # Between frames only: a payload receive is bounded by the sender's deadline.
            await asyncio.wait_for(ep.recv(header_buf), self.idle_timeout_s)
            header = Header.unpack(header_buf.data)
            if header.kind is Kind.DATA:
                await self._receive_chunk(ep, table, header)
            elif header.kind is Kind.FIN:
                status, received = table.fin_status(header.transfer_id)
                ack = Header(Kind.ACK, header.transfer_id, nbytes=received, status=status)
                await ep.send(_header_array(ack))
            else:
                raise FrameError(f"unexpected {header.kind.name} frame from a sender")

    async def _receive_chunk(self, ep: Any, table: TransferTable, header: Header) -> None:
        if not 0 < header.nbytes <= MAX_CHUNK_BYTES:
            raise FrameError(f"DATA frame of {header.nbytes} bytes")
        claim = table.claim(header, ep)
        if claim is None:
            if len(self._scratch) < header.nbytes:
                self._scratch = np.empty(header.nbytes, dtype=np.uint8)
            # Handlers may share the scratch: its content is thrown away anyway.
            await ep.recv(self._scratch[: header.nbytes])
            return
        received = False
        target = np.frombuffer(claim.view, dtype=np.uint8)
        try:
            await ep.recv(target)
            received = True
        finally:
            del target
            table.release(claim, received)


class UcxSender(Sender):
    name = "ucx"

    def __init__(
        self,
        retries: int = 2,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        connect_timeout_s: float = 5.0,
        key: bytes | None = None,
    ) -> None:
        super().__init__(retries)
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in (0, {MAX_CHUNK_BYTES}]")
        self.chunk_bytes = chunk_bytes
        self.connect_timeout_s = connect_timeout_s
        self._key = key
        self._endpoints: dict[str, Any] = {}
        self._closed = False

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
        if self._closed:
            raise TransferError("the ucx sender is closed")
        address = endpoint.get("ucx")
        if address is None:
            raise ValueError(f"endpoint {dict(endpoint)} has no ucx address")
        host, port = parse_address(address)
        check_runs(src, [(run.src_block, run.num_blocks) for run in runs], "source")
        self._key = resolve_key(self._key)  # no key, no transfer (SecurityError)
        deadline = time.monotonic() + timeout_s
        async with self._peer_turn(address, transfer_id, timeout_s):
            return await self._send_locked(
                address, host, port, transfer_id, src, list(runs), deadline, checksum
            )

    async def close(self) -> None:
        self._closed = True
        for ep in self._endpoints.values():
            ep.abort(period=_ABORT_PERIOD_NS)
        self._endpoints.clear()

    async def _send_locked(
        self,
        address: str,
        host: str,
        port: int,
        transfer_id: int,
        src: Region,
        runs: list[CopyRun],
        deadline: float,
        checksum: bool,
    ) -> int | None:
        attempts = self.retries + 1
        last_error: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(min(0.05 * 2**attempt, max(0.0, deadline - time.monotonic())))
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                ep = await asyncio.wait_for(self._connect(address, host, port), left)
                crc = await asyncio.wait_for(
                    self._stream(ep, address, transfer_id, src, runs, checksum),
                    deadline - time.monotonic(),
                )
                return crc if checksum else None
            except HandshakeError as e:
                self._drop(address)
                raise PeerNotMember(
                    f"data-plane peer ucx://{address} is not a cluster member: {e}"
                ) from None
            except asyncio.TimeoutError:
                self._drop(address)
                last_error = TimeoutError("deadline passed")
                break
            except _FAILURES as e:
                last_error = e
                self._drop(address)
        if time.monotonic() >= deadline:
            raise TransferTimeout(
                f"ucx transfer {transfer_id} to {address} timed out (last error: {last_error})"
            )
        raise TransferError(
            f"ucx transfer {transfer_id} to {address} failed after {attempts} attempts: "
            f"{last_error}"
        ) from last_error

    async def _connect(self, address: str, host: str, port: int) -> Any:
        ep = self._endpoints.get(address)
        if ep is not None and not ep.closed:
            return ep
        self._drop(address)
        _init_ucx()
        ep = await ucxx.create_endpoint(host, port, connect_timeout=self.connect_timeout_s)
        try:
            await asyncio.wait_for(self._handshake(ep), self.connect_timeout_s)
        except TimeoutError:
            ep.abort(period=_ABORT_PERIOD_NS)
            raise HandshakeError("no answer to the handshake in time") from None
        except BaseException:
            ep.abort(period=_ABORT_PERIOD_NS)
            raise
        self._endpoints[address] = ep
        return ep

    async def _handshake(self, ep: Any) -> None:
        """The initiator's half: nothing but HELLO and PROOF goes out before the receiver
        proved the key."""
        assert self._key is not None
        initiator = Initiator(self._key, "ucx")
        await ep.send(_array(initiator.hello()))
        challenge = np.empty(CHALLENGE_SIZE, dtype=np.uint8)
        await ep.recv(challenge)
        await ep.send(_array(initiator.proof(challenge.tobytes())))

    def _drop(self, address: str) -> None:
        ep = self._endpoints.pop(address, None)
        if ep is not None:
            with contextlib.suppress(*_FAILURES):
                ep.abort(period=_ABORT_PERIOD_NS)

    async def _stream(
        self,
        ep: Any,
        address: str,
        transfer_id: int,
        src: Region,
        runs: list[CopyRun],
        checksum: bool,
    ) -> int:
        crc = 0
        total = 0
        for run in runs:
            size = run.num_blocks * src.block_bytes
            for offset in range(0, size, self.chunk_bytes):
                nbytes = min(self.chunk_bytes, size - offset)
                header = Header(
                    Kind.DATA, transfer_id, run.dst_block, run.num_blocks, offset, nbytes
                )
                await ep.send(_header_array(header))
                start = run.src_block * src.block_bytes + offset
                payload = src.array[start : start + nbytes]
                try:
                    await ep.send(payload)
                    if checksum:
                        crc = zlib.crc32(payload.data, crc)
                finally:
                    # An exception's traceback keeps this frame (asyncio makes that a
                    # cycle); it must not keep the source region's memory exported.
                    del payload
                total += nbytes
        await ep.send(_header_array(Header(Kind.FIN, transfer_id, nbytes=total)))
        ack_buf = np.empty(HEADER_SIZE, dtype=np.uint8)
        await ep.recv(ack_buf)
        ack = Header.unpack(ack_buf.data)
        if ack.kind is not Kind.ACK or ack.transfer_id != transfer_id:
            raise FrameError(f"expected ACK of transfer {transfer_id}, got {ack}")
        if ack.status != AckStatus.COMPLETE:
            raise TransferRejected(
                f"ucx transfer {transfer_id} to {address}: receiver reports "
                f"{AckStatus(ack.status).name} ({ack.nbytes} of {total} bytes)"
            )
        return crc
