"""The sending daemon's leg of a transfer, one for KV blocks and named tensors alike:

    S ──Prepare{Receive,Tensor}──▶ D   D holds blocks (pages) and names the transfer
    S ══ bytes (runs) ═══════════▶ D   straight into them, over the transport D chose
    S ──CommitReceive────────────▶ D   D waits for every byte (+ checksum), hands them over
    failure after D prepared: S ──AbortReceive──▶ D (best effort; D's deadline backs it up)

What differs between blocks and tensors is given: the prepare request, the copy runs once
D has answered (none: nothing to move), and the commit request. The caller guards its
source memory (busy marks, pins, a sending count) around the leg.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from common.protocol import mempool as mp
from common.sockets import RpcClient
from services.mempool.data_plane import DataPlane, failure_kind
from services.mempool.incoming import IncomingTransfers
from services.mempool.pool import MemPoolError
from services.mempool.transfer_state import SendState, TransferCounters, send_state
from services.mempool.transport import CopyRun

_ABORT_TIMEOUT_S = 1.0


class Peers:
    """One RPC client per peer daemon address, reused by every transfer to it."""

    def __init__(self) -> None:
        self._clients: dict[str, RpcClient[Any, Any]] = {}

    def get(self, address: str) -> RpcClient[Any, Any]:
        client = self._clients.get(address)
        if client is None or client.closed:
            client = RpcClient(address, mp.MempoolRequest, mp.MempoolReply)
            self._clients[address] = client
        return client

    def close(self) -> None:
        for client in self._clients.values():
            client.close()


@dataclass(frozen=True)
class TransferShared:
    """What the block and the tensor transfer handlers of one daemon share."""

    peers: Peers  # RPC clients of the peer daemons
    incoming: IncomingTransfers  # the receiving side's records (commit, abort, expiry)
    counters: TransferCounters
    host_id: str  # same-host peers are offered shm


class TransferHandler:
    """Base of the daemon's transfer handlers: the data plane they move bytes over (the KV
    region's or the tensor arena's) and what they share with each other."""

    def __init__(self, plane: DataPlane, shared: TransferShared) -> None:
        self.plane = plane
        self.peers = shared.peers
        self.incoming = shared.incoming
        self.counters = shared.counters
        self.host_id = shared.host_id


@dataclass(frozen=True)
class Leg:
    """What one transfer sends, and how (`what` names it in errors: "transfer to X")."""

    what: str
    prepare: mp.PrepareReceive | mp.PrepareTensor
    runs: Callable[[mp.Prepared], list[CopyRun]]  # source -> the destinations D prepared
    commit: Callable[[mp.Prepared, int], mp.CommitReceive]  # (prepared, crc or -1)
    checksum: bool
    timeout_s: float


@dataclass(frozen=True)
class Sent:
    prepared: mp.Prepared
    committed: mp.Committed
    seconds: float


async def send_leg(
    leg: Leg, peer: RpcClient[Any, Any], plane: DataPlane, counters: TransferCounters
) -> Sent:
    """Run `leg` against `peer` within `leg.timeout_s`. A failure counts in
    `counters.transfers_failed` and raises a MemPoolError whose kind says why
    (`data_plane.failure_kind`); a cancelled leg still tells D to abort."""
    state = send_state(leg.what)
    start = time.perf_counter()
    deadline = start + leg.timeout_s

    def left_s() -> float:
        return max(0.01, deadline - time.perf_counter())

    prep: mp.Prepared | None = None
    try:
        prep = cast(mp.Prepared, await peer.call(leg.prepare, timeout_s=leg.timeout_s))
        state.advance(SendState.SENDING)
        crc = None
        runs = leg.runs(prep)
        if runs:  # nothing to move when the receiver had every block
            crc = await plane.sender(prep.transport).send(
                prep.endpoint,
                prep.transfer_id,
                plane.region,
                runs,
                timeout_s=left_s(),
                checksum=leg.checksum,
            )
        state.advance(SendState.COMMITTING)
        done = cast(
            mp.Committed,
            await peer.call(leg.commit(prep, -1 if crc is None else crc), timeout_s=left_s()),
        )
        state.advance(SendState.DONE)
    except BaseException as exc:
        if prep is not None and state.can(SendState.ABORTED):
            state.advance(SendState.ABORTED)
            with contextlib.suppress(Exception):
                await peer.call(mp.AbortReceive(prep.transfer_id), timeout_s=_ABORT_TIMEOUT_S)
        elif state.can(SendState.FAILED):
            state.advance(SendState.FAILED)
        if not isinstance(exc, Exception):
            raise  # cancelled: not a failed transfer
        counters.transfers_failed += 1
        if isinstance(exc, MemPoolError):
            raise
        raise MemPoolError(
            f"{leg.what} failed: {type(exc).__name__}: {exc}", kind=failure_kind(exc)
        ) from None
    seconds = time.perf_counter() - start
    counters.sent(prep.transport, done.nbytes, seconds)
    return Sent(prep, done, seconds)
