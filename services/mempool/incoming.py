"""The receiving daemon's transfers in flight, KV blocks and named tensors alike.

    PrepareReceive / PrepareTensor ─▶ an `Incoming` record (blocks or pages held) + a deadline
    CommitReceive ─▶ wait for every byte (+ checksum) ─▶ `finish`: index, pin, name
    AbortReceive, a failed commit, the deadline ─▶ `discard`: free what the record held

A record's state (`transfer_state.ReceiveState`) changes only along the table's moves.
Invariants: a live record is in `pending` under its transfer id, with an expiry timer at
deadline + grace; a terminal one is in neither. A record is freed only when no byte of
it can still land: the sender is done (it aborted, or asked to commit after sending) or
deadline + grace passed (it has given up), and `Receiver.cancel` returned, so the
receiver's own threads have let go where the transport fences writes; where that fails
the record waits in FAILED. Only the daemon's event loop calls in here, so no two moves
of one record interleave.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from abc import ABC, abstractmethod

from common.errors import ErrorKind, MemServeError
from common.logging import get_logger
from common.protocol import mempool as mp
from services.mempool.data_plane import DataPlane, failure_kind
from services.mempool.pool import MemPoolError
from services.mempool.transfer_state import (
    IllegalMove,
    ReceiveState,
    TransferCounters,
    receive_state,
)
from services.mempool.transport import Receiver

log = get_logger(__name__)

# How long a receiver keeps a transfer past its deadline before expiring it.
GRACE_S = 1.0

_LIVE_UNWAITED = (ReceiveState.PREPARED, ReceiveState.FAILED)  # nobody waits on these


class Incoming(ABC):
    """One transfer this daemon receives: what it holds and how to hand it over or free it."""

    def __init__(self, transfer_id: int, plane: DataPlane, transport: str, timeout_s: float):
        self.transfer_id = transfer_id
        self.state = receive_state(transfer_id)
        self.plane = plane
        self.transport = transport
        self.deadline = time.monotonic() + timeout_s
        self.timer: asyncio.TimerHandle | None = None

    @property
    def receiver(self) -> Receiver:
        return self.plane.receiver(self.transport)

    @property
    @abstractmethod
    def expects_bytes(self) -> bool:
        """False when nothing was left to send (the receiver had every block)."""

    @abstractmethod
    def check_commit(self, req: mp.CommitReceive) -> None:
        """Refuse a commit before waiting for its bytes (the transfer is then aborted)."""

    @abstractmethod
    def finish(self, req: mp.CommitReceive, nbytes: int) -> mp.Committed:
        """Every byte is in: hand them over. On failure it frees what it held itself."""

    @abstractmethod
    def discard(self) -> None:
        """Free what the transfer held (no byte of it can land any more)."""


class IncomingTransfers:
    """The live `Incoming` records by transfer id, and their commits, aborts and expiry."""

    def __init__(self, counters: TransferCounters) -> None:
        self.pending: dict[int, Incoming] = {}
        self.counters = counters
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self.pending)

    def new_id(self) -> int:
        return next(self._ids)

    def add(self, rec: Incoming, timeout_s: float) -> None:
        rec.timer = asyncio.get_running_loop().call_later(
            timeout_s + GRACE_S, self.expire, rec.transfer_id
        )
        self.pending[rec.transfer_id] = rec

    async def commit(self, req: mp.CommitReceive) -> mp.Committed:
        rec = self.pending.get(req.transfer_id)
        if rec is None:
            raise MemPoolError(
                f"unknown, expired or already finished transfer {req.transfer_id}",
                kind=ErrorKind.UNKNOWN_ID,
            )
        rec.state.advance(ReceiveState.COMMITTING)  # a second commit is refused here
        try:
            rec.check_commit(req)
            nbytes = 0
            if rec.expects_bytes:
                nbytes = await rec.receiver.wait_complete(
                    rec.transfer_id,
                    max(0.01, rec.deadline - time.monotonic()),
                    None if req.checksum < 0 else req.checksum,
                )
            if rec.state.state == ReceiveState.ABORTING:
                raise IllegalMove(f"transfer {req.transfer_id} was aborted while committing")
        except BaseException as exc:
            aborted = rec.state.state == ReceiveState.ABORTING
            # The sender asked to commit, so it is done writing: free at once.
            self._end(rec, ReceiveState.ABORTED)
            if not isinstance(exc, Exception) or isinstance(exc, MemServeError):
                raise
            if aborted:  # the abort cancelled the wait
                raise IllegalMove(
                    f"transfer {rec.transfer_id} was aborted while committing"
                ) from exc
            raise MemPoolError(f"{type(exc).__name__}: {exc}", kind=failure_kind(exc)) from exc
        self._forget(rec)
        self.counters.bytes_received += nbytes
        try:
            reply = rec.finish(req, nbytes)
        except BaseException:
            rec.state.advance(ReceiveState.ABORTED)
            raise
        rec.state.advance(ReceiveState.COMMITTED)
        return reply

    def abort(self, transfer_id: int, to: ReceiveState = ReceiveState.ABORTED) -> None:
        """Give the transfer up (the sender's abort; `to` EXPIRED: its deadline). A commit
        that waits for its bytes is told to fail, and it frees; unknown ids are ignored."""
        rec = self.pending.get(transfer_id)
        if rec is None:
            return
        if rec.state.state in _LIVE_UNWAITED:
            self._end(rec, to)
            return
        if rec.state.can(ReceiveState.ABORTING):
            rec.state.advance(ReceiveState.ABORTING)
        self._cancel(rec)  # wakes the waiting commit

    def expire(self, transfer_id: int) -> None:
        rec = self.pending.get(transfer_id)
        if rec is None:
            return
        log.warning("transfer expired before its commit", transfer_id=transfer_id)
        self.counters.transfers_failed += 1
        self._expire(rec)

    def _expire(self, rec: Incoming) -> None:
        try:
            self.abort(rec.transfer_id, ReceiveState.EXPIRED)
        except MemPoolError as exc:
            # Not fenced yet (rare: a receiver thread did not let go): try again later
            # rather than free memory a late write may still reach, or keep it forever.
            log.warning(
                "expired transfer not fenced yet", transfer_id=rec.transfer_id, error=str(exc)
            )
            rec.timer = asyncio.get_running_loop().call_later(GRACE_S, self._expire, rec)

    def _end(self, rec: Incoming, to: ReceiveState) -> None:
        """Fence the transfer's late writes, then free what it held (state `to`)."""
        try:
            self._cancel(rec)
        except MemPoolError:
            # Bytes may still land: keep the memory until the sender's abort or the deadline.
            if rec.state.state != ReceiveState.FAILED:
                rec.state.advance(ReceiveState.FAILED)
            raise
        rec.state.advance(to)
        self._forget(rec)
        rec.discard()
        log.info("transfer given up", transfer_id=rec.transfer_id, state=to.name)

    @staticmethod
    def _cancel(rec: Incoming) -> None:
        try:
            rec.receiver.cancel(rec.transfer_id)
        except Exception as exc:
            raise MemPoolError(
                f"transfer {rec.transfer_id}: late writes not fenced yet: {exc}",
                kind=failure_kind(exc),
            ) from exc

    def _forget(self, rec: Incoming) -> None:
        self.pending.pop(rec.transfer_id, None)
        if rec.timer is not None:
            rec.timer.cancel()
