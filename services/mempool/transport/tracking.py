"""Receiver-side bookkeeping shared by the chunked transports (tcp, ucx).

`TransferTable` decides, for every arriving DATA chunk, whether its bytes may go into the
region, and counts what arrived. Chunks are judged by the absolute byte range they name
(dst_block * block_bytes + offset, nbytes), not by the sender's run boundaries: the sender
coalesces (src, dst) pairs, the receiver only its destination blocks, so one expected run
may arrive as several sender runs. The rules that keep the region safe:

- `claim` hands out a region view only for a chunk of a transfer that is still active
  (expected, neither complete nor cancelled) whose byte range lies inside the transfer's
  expected blocks and has not fully arrived yet. Anything else gets `None`: the caller reads
  the payload into scratch memory and drops it.
- A claimed chunk registers its writer (a socket, an endpoint) until `release`. `cancel`
  removes the transfer at once (later claims fail) and returns the writers still filling
  its blocks, so the transport can abort those connections and wait for them: once they
  are released no byte of the transfer can land in the region any more.
- Received bytes are counted as a union of byte ranges, when a chunk has fully arrived, so a
  chunk resent after a reconnect (or overlapping one) is counted once. The transfer
  completes when the union covers every expected byte.

The table is used from connection threads (tcp) and from the event loop (ucx); one lock
guards it, and completion reaches the asyncio side through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import enum
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from services.mempool.region import Region
from services.mempool.transport.base import (
    ChecksumMismatch,
    Receiver,
    TransferError,
    TransferTimeout,
    check_runs,
    region_crc32,
)
from services.mempool.transport.frame import AckStatus, Header

# How many finished transfer ids are remembered, to tell "cancelled" from "never expected"
# in error messages and FIN answers. Older ids read as unknown, which is treated the same.
_HISTORY = 4096


class _State(enum.Enum):
    ACTIVE = "active"
    COMPLETE = "complete"
    CANCELLED = "cancelled"


class Coverage:
    """A union of half-open byte ranges, kept as sorted disjoint intervals."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.ends[i] >= end

    def add(self, start: int, end: int) -> int:
        """Add [start, end); returns how many of its bytes were not covered before."""
        # Intervals i..j-1 overlap or touch [start, end): they merge with it.
        i = bisect.bisect_left(self.ends, start)
        j = bisect.bisect_right(self.starts, end)
        overlap = sum(
            max(0, min(self.ends[k], end) - max(self.starts[k], start)) for k in range(i, j)
        )
        merged_start, merged_end = start, end
        if i < j:
            merged_start, merged_end = min(start, self.starts[i]), max(end, self.ends[j - 1])
        self.starts[i:j] = [merged_start]
        self.ends[i:j] = [merged_end]
        return end - start - overlap


@dataclass(eq=False)
class _Transfer:
    """One expected transfer. Mutable fields change only under the table's lock."""

    transfer_id: int
    runs: list[tuple[int, int]]
    span_starts: list[int]  # expected blocks as merged byte ranges [start, end)
    span_ends: list[int]
    expected: int
    done: asyncio.Future[_State]
    received: int = 0
    state: _State = _State.ACTIVE
    coverage: Coverage = field(default_factory=Coverage)
    writers: set[object] = field(default_factory=set)

    def contains(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.span_starts, start) - 1
        return i >= 0 and end <= self.span_ends[i]


@dataclass(eq=False)
class Claim:
    """The right to write one chunk's payload into `view` (region bytes [start, end))."""

    transfer: _Transfer
    start: int
    end: int
    writer: object
    view: memoryview


class TransferTable:
    def __init__(self, region: Region, loop: asyncio.AbstractEventLoop) -> None:
        self.region = region
        self.loop = loop
        self._lock = threading.Lock()
        self._writers_done = threading.Condition(self._lock)
        self._active: dict[int, _Transfer] = {}
        self._finished: OrderedDict[int, AckStatus] = OrderedDict()

    # -- event-loop side -------------------------------------------------------------------

    def expect(self, transfer_id: int, runs: list[tuple[int, int]]) -> None:
        expected = check_runs(self.region, runs, "destination")
        block_bytes = self.region.block_bytes
        spans = Coverage()
        for first, count in runs:
            if spans.add(first * block_bytes, (first + count) * block_bytes) != count * block_bytes:
                raise ValueError(f"transfer {transfer_id}: runs overlap at block {first}")
        done: asyncio.Future[_State] = self.loop.create_future()
        transfer = _Transfer(transfer_id, list(runs), spans.starts, spans.ends, expected, done)
        with self._lock:
            if transfer_id in self._active:
                raise ValueError(f"transfer {transfer_id} is already expected")
            self._finished.pop(transfer_id, None)
            self._active[transfer_id] = transfer
        if expected == 0:
            transfer.state = _State.COMPLETE
            done.set_result(_State.COMPLETE)

    async def wait_complete(self, transfer_id: int, timeout_s: float, checksum: int | None) -> int:
        with self._lock:
            transfer = self._active.get(transfer_id)
            history = self._finished.get(transfer_id)
        if transfer is None:
            why = "was cancelled" if history is AckStatus.CANCELLED else "is not expected"
            if history is AckStatus.COMPLETE:
                why = "already completed"
            raise TransferError(f"transfer {transfer_id} {why}")
        try:
            await asyncio.wait_for(asyncio.shield(transfer.done), timeout_s)
        except asyncio.TimeoutError:
            raise TransferTimeout(
                f"transfer {transfer_id}: {transfer.received} of {transfer.expected} bytes "
                f"after {timeout_s:g}s"
            ) from None
        # The state, not the future's value: a cancel racing the completion wins.
        with self._lock:
            cancelled = transfer.state is _State.CANCELLED
        if cancelled:
            raise TransferError(f"transfer {transfer_id} was cancelled")
        if checksum is not None:
            crc = await asyncio.to_thread(region_crc32, self.region, transfer.runs)
            if crc != checksum:
                self._forget(transfer, AckStatus.CANCELLED)
                raise ChecksumMismatch(
                    f"transfer {transfer_id}: crc32 {crc:#010x} of the received bytes, "
                    f"sender's {checksum:#010x}"
                )
        if not self._forget(transfer, AckStatus.COMPLETE):
            raise TransferError(f"transfer {transfer_id} was cancelled")
        return transfer.expected

    def cancel(self, transfer_id: int) -> tuple[_Transfer | None, list[object]]:
        """Deactivate a transfer; returns it and the writers still filling its blocks."""
        with self._lock:
            transfer = self._active.pop(transfer_id, None)
            if transfer is None:
                return None, []
            transfer.state = _State.CANCELLED
            self._remember(transfer_id, AckStatus.CANCELLED)
            writers = list(transfer.writers)
        self._resolve(transfer, _State.CANCELLED)
        return transfer, writers

    def wait_writers(self, transfer: _Transfer, timeout_s: float) -> bool:
        """Block until no writer fills `transfer`'s blocks; False if `timeout_s` passed."""
        deadline = time.monotonic() + timeout_s
        with self._writers_done:
            while transfer.writers:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._writers_done.wait(left)
        return True

    def cancel_all(self) -> list[tuple[_Transfer, list[object]]]:
        with self._lock:
            ids = list(self._active)
        cancelled = []
        for transfer_id in ids:
            transfer, writers = self.cancel(transfer_id)
            if transfer is not None:
                cancelled.append((transfer, writers))
        return cancelled

    # -- data side (connection threads or handler tasks) -------------------------------------

    def claim(self, header: Header, writer: object, *, view: bool = True) -> Claim | None:
        """Where a DATA chunk's payload may be written, or None to discard it.

        `view=False` leaves `Claim.view` empty: the caller writes region bytes
        [start, end) its own way (the collective transports, through a tensor)."""
        block_bytes = self.region.block_bytes
        if header.nbytes <= 0 or header.offset + header.nbytes > header.num_blocks * block_bytes:
            return None  # inconsistent header
        start = header.dst_block * block_bytes + header.offset
        end = start + header.nbytes
        with self._lock:
            transfer = self._active.get(header.transfer_id)
            if transfer is None or transfer.state is not _State.ACTIVE:
                return None
            if not transfer.contains(start, end) or transfer.coverage.covers(start, end):
                return None
            transfer.writers.add(writer)
        # Inside the expected (validated) blocks, so inside the region.
        return Claim(
            transfer, start, end, writer, self.region.buffer[start:end] if view else memoryview(b"")
        )

    def release(self, claim: Claim, received: bool) -> None:
        """End a claim; `received` says whether the whole chunk arrived."""
        transfer = claim.transfer
        complete = False
        with self._lock:
            transfer.writers.discard(claim.writer)
            # A transfer cancelled meanwhile has state CANCELLED: its bytes are not counted.
            if received and transfer.state is _State.ACTIVE:
                transfer.received += transfer.coverage.add(claim.start, claim.end)
                if transfer.received == transfer.expected:
                    transfer.state = _State.COMPLETE
                    complete = True
            self._writers_done.notify_all()
        # Drop our reference to the region's memory now, so the region can be closed; a
        # library still holding an export of the view (ucxx) keeps it alive instead.
        with contextlib.suppress(BufferError):
            claim.view.release()
        if complete:
            self._resolve(transfer, _State.COMPLETE)

    def fin_status(self, transfer_id: int) -> tuple[AckStatus, int]:
        with self._lock:
            transfer = self._active.get(transfer_id)
            if transfer is not None:
                if transfer.state is _State.COMPLETE:
                    return AckStatus.COMPLETE, transfer.received
                return AckStatus.INCOMPLETE, transfer.received
            return self._finished.get(transfer_id, AckStatus.UNKNOWN), 0

    # -- internals ---------------------------------------------------------------------------

    def _forget(self, transfer: _Transfer, status: AckStatus) -> bool:
        """End a transfer with `status`; False if `cancel` ended it first."""
        with self._lock:
            if transfer.state is _State.CANCELLED:
                return False
            if self._active.get(transfer.transfer_id) is transfer:
                del self._active[transfer.transfer_id]
            if status is not AckStatus.COMPLETE:
                transfer.state = _State.CANCELLED
            self._remember(transfer.transfer_id, status)
            return True

    def _remember(self, transfer_id: int, status: AckStatus) -> None:
        self._finished[transfer_id] = status
        self._finished.move_to_end(transfer_id)
        while len(self._finished) > _HISTORY:
            self._finished.popitem(last=False)

    def _resolve(self, transfer: _Transfer, state: _State) -> None:
        def resolve() -> None:
            if not transfer.done.done():
                transfer.done.set_result(state)

        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(resolve)


class TrackedReceiver(Receiver):
    """A receiver whose arrivals a `TransferTable` judges (tcp, ucx, gloo/nccl): `start`
    creates the table on the running loop; expecting and waiting go through it."""

    def __init__(self, region: Region) -> None:
        super().__init__(region)
        self._table: TransferTable | None = None

    def _start_table(self) -> TransferTable:
        self._table = TransferTable(self.region, asyncio.get_running_loop())
        return self._table

    def _require_table(self) -> TransferTable:
        if self._table is None:
            raise RuntimeError(f"{type(self).__name__}.start() has not been awaited")
        return self._table

    def expect(self, transfer_id: int, runs: list[tuple[int, int]]) -> None:
        self._require_table().expect(transfer_id, runs)

    async def wait_complete(
        self, transfer_id: int, timeout_s: float, checksum: int | None = None
    ) -> int:
        return await self._require_table().wait_complete(transfer_id, timeout_s, checksum)
