"""Same-host transport: the sender copies straight into the receiver's shared-memory segment.

The receiver's endpoint names its `ShmRegion` segment (plus its geometry, read anew for
every transfer: KunServe split mode re-views the segment in smaller blocks in place, and
the sender addresses it in bytes from the endpoint's geometry). The sender maps
that segment once (attachments are cached per name and dropped in `close`) and copies each
run from its source region into the destination region with numpy, in a worker thread
(on the event loop itself for transfers of at most `inline_bytes`), in chunks of
`chunk_bytes` (memcpy speed; the GIL is released during each copy).

Who writes what, when: the destination daemon D never writes these bytes; S's sender thread
writes exactly the expected runs' blocks, during `send`. D cannot observe the copy, so:

- Completion is the commit itself. S commits only after `send` returned, which is after the
  last byte was copied; the commit RPC orders that copy before D's `wait_complete` (a
  syscall-mediated message, so the stores are visible to D). `wait_complete` therefore
  returns at once with the expected byte count, verifying the checksum when one is given.
  It can never time out on missing bytes.
- Cancellation cannot stop a copy in progress (`cancel_fences_writes` is False). The sender
  checks its deadline (`send`'s `timeout_s`, counted from the call) before every chunk and
  starts no chunk after it, so at most one chunk (`chunk_bytes`, a few milliseconds of copy)
  is still being written after the deadline. The rule for D: after cancelling an shm
  transfer whose sender may still be running, keep its blocks allocated until the
  transfer's deadline plus `SHM_REUSE_GRACE_S` has passed; then reuse is safe. This holds
  when S's send deadline is no later than D's transfer deadline, which is the case when S
  derives its send timeout from the same overall deadline it gave D in the prepare request
  (its send starts after D's prepare, with what is left of that budget). Both daemons run
  on one host and share its monotonic clock, so the deadlines compare. Once S's `send` has
  returned or raised, nothing more is written and D may free at once.
- A stale attachment (D restarted and re-created a segment under the same name) is detected
  by comparing the segment's inode before every send, and re-attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from services.mempool.region import Region, ShmRegion
from services.mempool.transport.base import (
    ChecksumMismatch,
    CopyRun,
    Receiver,
    Sender,
    TransferError,
    TransferTimeout,
    check_runs,
    region_crc32,
    run_blocking,
)

CHUNK_BYTES = 64 << 20
# Transfers up to this size are copied on the event loop (tens of microseconds) rather than
# in the thread pool, whose hand-off costs about as much as the copy.
INLINE_BYTES = 1 << 20
# Extra wait, beyond a cancelled transfer's deadline, before D reuses its blocks: covers
# the one chunk a sender may still be copying when its deadline passes.
SHM_REUSE_GRACE_S = 1.0


@dataclass
class _Expected:
    runs: list[tuple[int, int]]
    nbytes: int


class ShmReceiver(Receiver):
    name = "shm"
    cancel_fences_writes = False

    def __init__(self, region: Region) -> None:
        if not isinstance(region, ShmRegion):
            raise TypeError(f"the shm transport needs a ShmRegion, not {type(region).__name__}")
        super().__init__(region)
        self.shm_region = region
        self._expected: dict[int, _Expected] = {}
        self._cancelled: set[int] = set()

    async def start(self) -> dict[str, str]:
        return {"shm": self.shm_region.name, **self.geometry()}

    def geometry(self) -> dict[str, str]:
        # Per transfer: the sender addresses our segment in these blocks.
        return {
            "shm.block_bytes": str(self.region.block_bytes),
            "shm.max_blocks": str(self.region.max_blocks),
        }

    def expect(self, transfer_id: int, runs: list[tuple[int, int]]) -> None:
        nbytes = check_runs(self.region, runs, "destination")
        if transfer_id in self._expected:
            raise ValueError(f"transfer {transfer_id} is already expected")
        self._cancelled.discard(transfer_id)
        self._expected[transfer_id] = _Expected(list(runs), nbytes)

    async def wait_complete(
        self, transfer_id: int, timeout_s: float, checksum: int | None = None
    ) -> int:
        expected = self._expected.get(transfer_id)
        if expected is None:
            why = "was cancelled" if transfer_id in self._cancelled else "is not expected"
            raise TransferError(f"transfer {transfer_id} {why}")
        if checksum is not None:
            try:
                crc = await asyncio.wait_for(
                    asyncio.to_thread(region_crc32, self.region, expected.runs), timeout_s
                )
            except asyncio.TimeoutError:
                raise TransferTimeout(
                    f"transfer {transfer_id}: checksum not computed within {timeout_s:g}s"
                ) from None
            if self._expected.get(transfer_id) is not expected:
                raise TransferError(f"transfer {transfer_id} was cancelled")
            if crc != checksum:
                self._expected.pop(transfer_id, None)
                raise ChecksumMismatch(
                    f"transfer {transfer_id}: crc32 {crc:#010x} of the received bytes, "
                    f"sender's {checksum:#010x}"
                )
        self._expected.pop(transfer_id, None)
        return expected.nbytes

    def cancel(self, transfer_id: int) -> None:
        if self._expected.pop(transfer_id, None) is not None:
            # Only to word wait_complete's error; cleared wholesale to bound its size.
            self._cancelled.add(transfer_id)
            if len(self._cancelled) > 4096:
                self._cancelled.clear()

    async def close(self) -> None:
        self._expected.clear()


@dataclass(eq=False)
class _Attachment:
    region: ShmRegion
    inode: int


class ShmSender(Sender):
    name = "shm"

    def __init__(
        self,
        retries: int = 2,
        *,
        chunk_bytes: int = CHUNK_BYTES,
        inline_bytes: int = INLINE_BYTES,
        max_concurrent: int = 4,
    ) -> None:
        super().__init__(retries)
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.chunk_bytes = chunk_bytes
        self.inline_bytes = inline_bytes
        self._attached: dict[str, _Attachment] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="shm-tx")
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
            raise TransferError("the shm sender is closed")
        name = endpoint.get("shm")
        if name is None:
            raise ValueError(f"endpoint {dict(endpoint)} has no shm segment")
        try:
            block_bytes = int(endpoint["shm.block_bytes"])
            max_blocks = int(endpoint["shm.max_blocks"])
        except (KeyError, ValueError):
            raise ValueError(f"endpoint {dict(endpoint)} lacks the segment's geometry") from None
        if block_bytes != src.block_bytes:
            raise ValueError(
                f"segment {name} has {block_bytes}-byte blocks, the source {src.block_bytes}"
            )
        check_runs(src, [(run.src_block, run.num_blocks) for run in runs], "source")
        for run in runs:
            if run.dst_block < 0 or run.dst_block + run.num_blocks > max_blocks:
                raise ValueError(f"destination run {run} outside segment {name}")
        deadline = time.monotonic() + timeout_s
        abandon = threading.Event()
        copy = functools.partial(
            self._copy,
            name,
            block_bytes,
            max_blocks,
            transfer_id,
            src,
            list(runs),
            deadline,
            checksum,
            abandon,
        )
        if sum(run.num_blocks for run in runs) * block_bytes <= self.inline_bytes:
            return copy()  # a copy this small takes less time than handing it to a thread
        return await run_blocking(
            self._executor,
            copy,
            timeout_s=timeout_s,
            abandon=abandon,
            what=f"shm transfer {transfer_id} to {name}",
        )

    async def close(self) -> None:
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, True)
        with self._lock:
            attached = list(self._attached.values())
            self._attached.clear()
        for attachment in attached:
            attachment.region.close()

    def _attach(self, name: str, block_bytes: int, max_blocks: int) -> ShmRegion:
        inode = os.stat(f"/dev/shm/{name.lstrip('/')}").st_ino
        with self._lock:
            cached = self._attached.get(name)
            if cached is not None and cached.inode == inode:
                # The same segment may be viewed in other blocks now (split mode): the
                # copy addresses it in bytes from the endpoint's geometry, so only its
                # size must agree.
                if cached.region.array.size != block_bytes * max_blocks:
                    raise ValueError(f"segment {name} changed size")
                return cached.region
            if cached is not None:
                # D re-created the segment: the old mapping no longer reaches D. A copy
                # still running into it keeps it mapped; it goes when that copy ends.
                del self._attached[name]
                with contextlib.suppress(BufferError):
                    cached.region.close()
            region = ShmRegion.attach(name, block_bytes, max_blocks)
            self._attached[name] = _Attachment(region, inode)
            return region

    def _copy(
        self,
        name: str,
        block_bytes: int,
        max_blocks: int,
        transfer_id: int,
        src: Region,
        runs: list[CopyRun],
        deadline: float,
        checksum: bool,
        abandon: threading.Event,
    ) -> int | None:
        last_error: OSError | None = None
        dst: ShmRegion | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.05 * 2**attempt, max(0.0, deadline - time.monotonic())))
            try:
                dst = self._attach(name, block_bytes, max_blocks)
                break
            except OSError as e:
                last_error = e
        if dst is None:
            raise TransferError(
                f"shm transfer {transfer_id}: cannot attach segment {name} after "
                f"{self.retries + 1} attempts: {last_error}"
            ) from last_error
        crc = 0
        bb = block_bytes
        for run in runs:
            src_start, dst_start = run.src_block * bb, run.dst_block * bb
            size = run.num_blocks * bb
            dst.populate_bytes(dst_start, size)  # one call, not a fault per page
            for offset in range(0, size, self.chunk_bytes):
                # The deadline check is what makes D's reuse rule (module docstring) safe.
                if time.monotonic() >= deadline:
                    raise TransferTimeout(f"shm transfer {transfer_id} to {name} timed out")
                if abandon.is_set() or self._closed:
                    raise TransferError(f"shm transfer {transfer_id} to {name} abandoned")
                n = min(self.chunk_bytes, size - offset)
                # Slices, not locals bound to whole-region arrays: nothing here outlives the
                # copy, so regions can be closed even while a traceback keeps this frame.
                np.copyto(
                    dst.array[dst_start + offset : dst_start + offset + n],
                    src.array[src_start + offset : src_start + offset + n],
                )
                if checksum:
                    crc = zlib.crc32(
                        src.array[src_start + offset : src_start + offset + n].data, crc
                    )
        return crc if checksum else None
