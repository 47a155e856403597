"""Transport interface: moving KV blocks from one daemon's region into another's.

A transfer moves a list of `CopyRun`s from the source daemon S's region into the destination
daemon D's region. The control protocol around it (ZeroMQ RPC, owned by the daemon) is:

1. S asks D to prepare; D allocates destination blocks and calls
   `receiver.expect(transfer_id, runs)`, then replies with `await receiver.start()`'s endpoint.
2. S calls `await sender.send(endpoint, transfer_id, region, runs, timeout_s=...)`.
3. S tells D to commit; D calls `await receiver.wait_complete(transfer_id, timeout_s, crc)`,
   which returns only once every expected byte is in D's region, then D indexes the blocks.
4. On any failure or timeout D calls `receiver.cancel(transfer_id)` and frees the blocks.

Invariants every transport keeps:

- Where the receiver places the bytes (tcp, ucx), only bytes of a transfer that is currently
  expected (between `expect` and its `wait_complete` success, `cancel`, or failure) are
  written into the destination region, and only inside that transfer's expected blocks.
  Data for unknown, finished or cancelled transfers is read and discarded, so D may free
  and reuse blocks once the transfer is over. The sender's runs need not match the
  receiver's: S coalesces (src, dst) pairs, D may coalesce only its destination blocks.
- `cancel` fences writes where the transport can (`Receiver.cancel_fences_writes`): when it
  returns, no write for that transfer is in progress and none will start. The shared-memory
  transport cannot (the sender copies directly into D's segment); see `shm.py` for the rule
  D must follow there.
- Source bytes are only read. A transfer's checksum is zlib.crc32 over the bytes of its
  runs concatenated in run order: the sender computes it over the source bytes while
  sending, the receiver over the destination bytes of its expected runs after completion.
  The two agree when both list the destination blocks in the same order (as coalescing
  the same pair list on both sides does).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import zlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, ClassVar

from services.mempool.region import Region


@dataclass(frozen=True)
class CopyRun:
    """`num_blocks` consecutive blocks from `src_block` (source) to `dst_block` (destination)."""

    src_block: int
    dst_block: int
    num_blocks: int


def coalesce(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[CopyRun]:
    """Merge (src, dst) block pairs into runs that are consecutive on both sides.

    Order is kept: the runs list the pairs in the order given, so a checksum over the runs
    equals one over the blocks in that order.
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    runs: list[CopyRun] = []
    start_src = start_dst = count = 0
    for src, dst in zip(src_ids, dst_ids, strict=True):
        if src < 0 or dst < 0:
            raise ValueError(f"negative block id in pair ({src}, {dst})")
        if count and src == start_src + count and dst == start_dst + count:
            count += 1
            continue
        if count:
            runs.append(CopyRun(start_src, start_dst, count))
        start_src, start_dst, count = src, dst, 1
    if count:
        runs.append(CopyRun(start_src, start_dst, count))
    return runs


class TransferError(RuntimeError):
    """A transfer failed: peer unreachable, protocol error, cancelled or unknown transfer."""


class TransferTimeout(TransferError, TimeoutError):
    """A transfer did not finish within its timeout."""


class TransferRejected(TransferError):
    """The receiver answered the sender's FIN with something other than COMPLETE (the
    transfer was cancelled or is unknown there): retrying cannot help."""


class PeerNotMember(TransferError):
    """The data-plane peer failed the handshake (handshake.py): it did not prove the
    cluster key, or did not answer it. Nothing but the greeting was sent; retrying cannot
    help."""


class ChecksumMismatch(TransferError):
    """The bytes that arrived do not match the checksum the sender computed."""


def check_runs(region: Region, runs: Sequence[tuple[int, int]], side: str) -> int:
    """Validate (first_block, num_blocks) runs against `region`; returns their total bytes."""
    total = 0
    for first, count in runs:
        if count <= 0 or first < 0 or first + count > region.max_blocks:
            raise ValueError(
                f"{side} run [{first}, {first + count}) outside a region of {region.max_blocks}"
            )
        total += count * region.block_bytes
    return total


def region_crc32(region: Region, runs: Sequence[tuple[int, int]]) -> int:
    """zlib.crc32 of the bytes of `runs` (first_block, num_blocks) in order.

    zlib releases the GIL on large buffers, so callers run this in a worker thread.
    """
    crc = 0
    for first, count in runs:
        crc = zlib.crc32(region.host_view(first, count), crc)
    return crc


class Receiver(ABC):
    """The destination side of a transport; one per transport per daemon.

    All methods are called from the daemon's event loop thread.
    """

    name: ClassVar[str]
    # True when `cancel` returning guarantees no further write for that transfer.
    cancel_fences_writes: ClassVar[bool]

    def __init__(self, region: Region) -> None:
        self.region = region

    @abstractmethod
    async def start(self) -> dict[str, str]:
        """Start accepting data; returns the endpoint info a Sender needs (idempotent)."""

    def geometry(self) -> dict[str, str]:
        """Endpoint fields that describe the region's current block geometry, read anew
        for every transfer (KunServe split mode changes it in place). Empty for transports
        whose receiver places the bytes itself from the live region (tcp, ucx, gloo)."""
        return {}

    @abstractmethod
    def expect(self, transfer_id: int, runs: list[tuple[int, int]]) -> None:
        """Register a transfer of `runs` (dst_block, num_blocks); data may arrive afterwards.

        Raises ValueError for runs outside the region or an id that is still expected.
        """

    @abstractmethod
    async def wait_complete(
        self, transfer_id: int, timeout_s: float, checksum: int | None = None
    ) -> int:
        """Wait until every expected byte is in the region; returns the bytes received.

        Success, a checksum mismatch or an unknown/cancelled id ends the transfer (later data
        is discarded). On TransferTimeout the transfer stays expected: the caller cancels it.
        Raises TransferTimeout, ChecksumMismatch, or TransferError (unknown or cancelled id).
        """

    @abstractmethod
    def cancel(self, transfer_id: int) -> None:
        """Forget a transfer: its late data is discarded. Unknown ids are ignored.

        Where `cancel_fences_writes`, no write for the transfer is in progress once this
        returns; if that cannot be established (tcp: a connection thread did not let go
        in time) it raises TransferError, and the blocks must not be reused yet.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop receiving and release sockets and threads; pending transfers are cancelled."""


class Sender(ABC):
    """The source side of a transport; one per transport per daemon, shared by transfers."""

    name: ClassVar[str]

    def __init__(self, retries: int = 2) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.retries = retries
        self._peer_locks: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def _peer_turn(
        self, address: str, transfer_id: int, timeout_s: float
    ) -> AsyncIterator[None]:
        """Hold `address`'s connection alone (one transfer at a time on a stream transport);
        TransferTimeout if the transfers before it keep it busy for `timeout_s`."""
        lock = self._peer_locks.setdefault(address, asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), timeout_s)
        except asyncio.TimeoutError:
            raise TransferTimeout(
                f"{self.name} transfer {transfer_id} to {address}: peer busy for {timeout_s:g}s"
            ) from None
        try:
            yield
        finally:
            lock.release()

    @abstractmethod
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
        """Move the bytes of `runs` from `src` to the peer at `endpoint`.

        Returns the crc32 of the bytes sent (in run order) when `checksum`, else None.
        A failed connection is retried up to `retries` times; then TransferError naming the
        peer. TransferTimeout when `timeout_s` passes first.
        """

    @abstractmethod
    async def close(self) -> None:
        """Drop cached connections/attachments; the sender is unusable afterwards."""


async def run_blocking(
    executor: Executor,
    fn: Callable[..., Any],
    *args: Any,
    timeout_s: float,
    abandon: threading.Event,
    what: str,
) -> Any:
    """Run a sender's blocking copy/send loop in `executor` and wait for it.

    The thread honours the deadline itself; the margin here only matters when the pool is
    saturated or a thread is stuck, and then the caller is not left waiting. On timeout or
    cancellation `abandon` tells the thread to stop at its next chunk.
    """
    work = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await asyncio.wait_for(work, timeout_s + 5.0)
    except TransferError:
        raise  # TransferTimeout is a TimeoutError too: keep the thread's own message
    except asyncio.TimeoutError:
        abandon.set()
        raise TransferTimeout(f"{what}: no result after {timeout_s:g}s") from None
    except asyncio.CancelledError:
        abandon.set()
        raise
