"""The receiving side's records, driven directly (a scripted receiver stands in for the
transport): each RPC moves a record along the state table, a refused move leaves it as
it was, and whatever way a transfer ends, what it held is freed exactly once and only
when no byte of it can still land."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from common.errors import ErrorKind
from common.protocol import mempool as mp
from services.mempool import incoming
from services.mempool.incoming import Incoming, IncomingTransfers
from services.mempool.pool import MemPoolError
from services.mempool.transfer_state import ReceiveState, TransferCounters
from services.mempool.transport import TransferError


class ScriptedReceiver:
    """wait_complete waits until the test calls `complete`; `cancel` fails the wait, or
    raises (cannot fence late writes yet) while `unfenced` > 0."""

    def __init__(self) -> None:
        self.waits: dict[int, asyncio.Future[int]] = {}
        self.cancelled: list[int] = []
        self.unfenced = 0

    async def wait_complete(self, tid: int, timeout_s: float, checksum: int | None) -> int:
        self.waits[tid] = asyncio.get_running_loop().create_future()
        return await asyncio.wait_for(self.waits[tid], timeout_s)

    def complete(self, tid: int, nbytes: int) -> None:
        self.waits[tid].set_result(nbytes)

    def cancel(self, tid: int) -> None:
        if self.unfenced:
            self.unfenced -= 1
            raise TransferError("a connection thread did not let go")
        self.cancelled.append(tid)
        wait = self.waits.get(tid)
        if wait is not None and not wait.done():
            wait.set_exception(TransferError(f"transfer {tid} cancelled"))


class Plane:
    def __init__(self) -> None:
        self.rx = ScriptedReceiver()

    def receiver(self, transport: str) -> ScriptedReceiver:
        return self.rx


class Record(Incoming):
    def __init__(self, tid: int, plane: Any, timeout_s: float = 30.0) -> None:
        super().__init__(tid, plane, "tcp", timeout_s)
        self.finished = 0
        self.discarded = 0

    @property
    def expects_bytes(self) -> bool:
        return True

    def check_commit(self, req: mp.CommitReceive) -> None:
        if req.tokens == b"bad!":
            raise MemPoolError("tokens do not fit", kind=ErrorKind.BAD_REQUEST)

    def finish(self, req: mp.CommitReceive, nbytes: int) -> mp.Committed:
        self.finished += 1
        return mp.Committed(nbytes=nbytes)

    def discard(self) -> None:
        self.discarded += 1


def open_record(transfers: IncomingTransfers, plane: Plane, timeout_s: float = 30.0) -> Record:
    rec = Record(transfers.new_id(), plane, timeout_s)
    transfers.add(rec, timeout_s)
    return rec


async def until_waiting(plane: Plane, rec: Record) -> None:
    while rec.transfer_id not in plane.rx.waits:
        await asyncio.sleep(0)


async def test_a_commit_hands_the_bytes_over_once() -> None:
    counters = TransferCounters()
    transfers, plane = IncomingTransfers(counters), Plane()
    rec = open_record(transfers, plane)
    commit = asyncio.create_task(transfers.commit(mp.CommitReceive(rec.transfer_id)))
    await until_waiting(plane, rec)
    assert rec.state.state == ReceiveState.COMMITTING
    plane.rx.complete(rec.transfer_id, 4096)
    assert (await commit).nbytes == 4096
    assert rec.state.state == ReceiveState.COMMITTED and (rec.finished, rec.discarded) == (1, 0)
    assert len(transfers) == 0 and counters.bytes_received == 4096
    with pytest.raises(MemPoolError, match="unknown") as info:  # the record is gone
        await transfers.commit(mp.CommitReceive(rec.transfer_id))
    assert info.value.kind is ErrorKind.UNKNOWN_ID


async def test_a_second_commit_is_refused_and_the_first_goes_on() -> None:
    transfers, plane = IncomingTransfers(TransferCounters()), Plane()
    rec = open_record(transfers, plane)
    first = asyncio.create_task(transfers.commit(mp.CommitReceive(rec.transfer_id)))
    await until_waiting(plane, rec)
    with pytest.raises(MemPoolError, match="COMMITTING -> COMMITTING") as info:
        await transfers.commit(mp.CommitReceive(rec.transfer_id))
    assert info.value.kind is ErrorKind.REFUSED and rec.state.state == ReceiveState.COMMITTING
    plane.rx.complete(rec.transfer_id, 10)
    assert (await first).nbytes == 10 and rec.finished == 1


async def test_an_abort_while_committing_fails_that_commit_which_frees() -> None:
    transfers, plane = IncomingTransfers(TransferCounters()), Plane()
    rec = open_record(transfers, plane)
    commit = asyncio.create_task(transfers.commit(mp.CommitReceive(rec.transfer_id)))
    await until_waiting(plane, rec)
    transfers.abort(rec.transfer_id)
    assert rec.state.state == ReceiveState.ABORTING and rec.discarded == 0  # the commit frees
    with pytest.raises(MemPoolError, match="aborted while committing") as info:
        await commit
    assert info.value.kind is ErrorKind.REFUSED
    assert rec.state.state == ReceiveState.ABORTED and (rec.finished, rec.discarded) == (0, 1)
    assert len(transfers) == 0


async def test_an_abort_before_the_commit_frees_at_once() -> None:
    transfers, plane = IncomingTransfers(TransferCounters()), Plane()
    rec = open_record(transfers, plane)
    transfers.abort(rec.transfer_id)
    transfers.abort(rec.transfer_id)  # a repeated abort is a no-op
    assert rec.state.state == ReceiveState.ABORTED and rec.discarded == 1
    assert plane.rx.cancelled == [rec.transfer_id] and len(transfers) == 0


async def test_a_refused_commit_aborts_the_transfer() -> None:
    transfers, plane = IncomingTransfers(TransferCounters()), Plane()
    rec = open_record(transfers, plane)
    with pytest.raises(MemPoolError, match="do not fit") as info:
        await transfers.commit(mp.CommitReceive(rec.transfer_id, tokens=b"bad!"))
    assert info.value.kind is ErrorKind.BAD_REQUEST
    assert rec.state.state == ReceiveState.ABORTED and rec.discarded == 1 and len(transfers) == 0


async def test_a_failed_wait_keeps_its_kind() -> None:
    transfers, plane = IncomingTransfers(TransferCounters()), Plane()
    rec = open_record(transfers, plane, timeout_s=0.05)  # the wait times out
    with pytest.raises(MemPoolError, match="TimeoutError") as info:
        await transfers.commit(mp.CommitReceive(rec.transfer_id))
    assert info.value.kind is ErrorKind.TIMEOUT
    assert rec.state.state == ReceiveState.ABORTED and rec.discarded == 1


async def test_an_unfenced_failure_is_freed_once_fenced_after_the_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(incoming, "GRACE_S", 0.0)
    counters = TransferCounters()
    transfers, plane = IncomingTransfers(counters), Plane()
    rec = open_record(transfers, plane, timeout_s=0.2)
    plane.rx.unfenced = 2  # the abort and the first expiry cannot fence it; the retry can
    with pytest.raises(MemPoolError, match="not fenced") as info:
        transfers.abort(rec.transfer_id)
    assert info.value.kind is ErrorKind.UNAVAILABLE
    # Bytes may still land: the blocks stay held, and no commit may use them.
    assert rec.state.state == ReceiveState.FAILED and rec.discarded == 0 and len(transfers) == 1
    with pytest.raises(MemPoolError, match="FAILED -> COMMITTING") as info:
        await transfers.commit(mp.CommitReceive(rec.transfer_id))
    assert info.value.kind is ErrorKind.REFUSED
    while len(transfers):  # the expiry timer fences again (and again) and frees
        await asyncio.sleep(0.01)
    assert rec.state.state == ReceiveState.EXPIRED and rec.discarded == 1
    assert counters.transfers_failed == 1 and plane.rx.unfenced == 0


async def test_a_transfer_never_committed_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(incoming, "GRACE_S", 0.0)
    counters = TransferCounters()
    transfers, plane = IncomingTransfers(counters), Plane()
    rec = open_record(transfers, plane, timeout_s=0.01)
    while len(transfers):
        await asyncio.sleep(0.01)
    assert rec.state.state == ReceiveState.EXPIRED and rec.discarded == 1
    assert counters.transfers_failed == 1 and plane.rx.cancelled == [rec.transfer_id]
