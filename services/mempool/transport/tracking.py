"""Receiver-side bookkeeping shared by the chunked transports (tcp, ucx).

`TransferTable` decides, for every arriving DATA chunk, whether its bytes may go into the
region, and counts what arrived. The rules that keep the region safe:

- `claim` hands out a region view only for a chunk of a transfer that is still active
  (expected, neither complete nor cancelled), that names one of its expected runs exactly,
  lies inside that run, and has not arrived yet. Anything else gets `None`: the caller reads
  the payload into scratch memory and drops it.
- A claimed chunk registers its writer (a socket, an endpoint) until `release`. `cancel`
  removes the transfer at once (later claims fail) and returns the writers still filling
  its blocks, so the transport can abort those connections and wait for them: once they
  are released no byte of the transfer can land in the region any more.
- Bytes are counted per chunk (dst_block, offset) once, when the chunk is fully received,
  so a chunk resent after a reconnect is idempotent. The transfer completes when the count
  reaches the expected total.

The table is used from connection threads (tcp) and from the event loop (ucx); one lock
guards it, and completion reaches the asyncio side through `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from services.mempool.region import Region
from services.mempool.transport.base import (
    ChecksumMismatch,
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


@dataclass(eq=False)
class _Transfer:
    """One expected transfer. Mutable fields change only under the table's lock."""

    transfer_id: int
    runs: list[tuple[int, int]]
    run_blocks: dict[int, int]  # dst_block -> num_blocks of each expected run
    expected: int
    done: asyncio.Future[_State]
    received: int = 0
    state: _State = _State.ACTIVE
    chunks: set[tuple[int, int]] = field(default_factory=set)
    writers: set[object] = field(default_factory=set)


@dataclass(eq=False)
class Claim:
    """The right to write one chunk's payload into `view` (part of the region)."""

    transfer: _Transfer
    header: Header
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
        run_blocks: dict[int, int] = {}
        covered: set[int] = set()
        for first, count in runs:
            blocks = range(first, first + count)
            if not covered.isdisjoint(blocks):
                raise ValueError(f"transfer {transfer_id}: runs overlap at block {first}")
            covered.update(blocks)
            run_blocks[first] = count
        done: asyncio.Future[_State] = self.loop.create_future()
        transfer = _Transfer(transfer_id, list(runs), run_blocks, expected, done)
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
            state = await asyncio.wait_for(asyncio.shield(transfer.done), timeout_s)
        except asyncio.TimeoutError:
            raise TransferTimeout(
                f"transfer {transfer_id}: {transfer.received} of {transfer.expected} bytes "
                f"after {timeout_s:g}s"
            ) from None
        if state is _State.CANCELLED:
            raise TransferError(f"transfer {transfer_id} was cancelled")
        if checksum is not None:
            crc = await asyncio.to_thread(region_crc32, self.region, transfer.runs)
            if crc != checksum:
                self._forget(transfer, AckStatus.CANCELLED)
                raise ChecksumMismatch(
                    f"transfer {transfer_id}: crc32 {crc:#010x} of the received bytes, "
                    f"sender's {checksum:#010x}"
                )
        self._forget(transfer, AckStatus.COMPLETE)
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

    def claim(self, header: Header, writer: object) -> Claim | None:
        """Where a DATA chunk's payload may be written, or None to discard it."""
        with self._lock:
            transfer = self._active.get(header.transfer_id)
            if transfer is None or transfer.state is not _State.ACTIVE:
                return None
            if transfer.run_blocks.get(header.dst_block) != header.num_blocks:
                return None
            run_bytes = header.num_blocks * self.region.block_bytes
            if header.nbytes <= 0 or header.offset < 0 or header.offset + header.nbytes > run_bytes:
                return None
            if (header.dst_block, header.offset) in transfer.chunks:
                return None
            transfer.writers.add(writer)
        run = self.region.blocks(header.dst_block, header.num_blocks)
        return Claim(transfer, header, writer, run[header.offset : header.offset + header.nbytes])

    def release(self, claim: Claim, received: bool) -> None:
        """End a claim; `received` says whether the whole chunk arrived."""
        transfer, header = claim.transfer, claim.header
        complete = False
        with self._lock:
            transfer.writers.discard(claim.writer)
            key = (header.dst_block, header.offset)
            # A transfer cancelled meanwhile has state CANCELLED: its bytes are not counted.
            if received and transfer.state is _State.ACTIVE and key not in transfer.chunks:
                transfer.chunks.add(key)
                transfer.received += header.nbytes
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

    def _forget(self, transfer: _Transfer, status: AckStatus) -> None:
        with self._lock:
            if self._active.get(transfer.transfer_id) is transfer:
                del self._active[transfer.transfer_id]
            if status is not AckStatus.COMPLETE:
                transfer.state = _State.CANCELLED
            self._remember(transfer.transfer_id, status)

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
