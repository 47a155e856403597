"""A block region: the memory that holds one tier's KV blocks.

    region bytes: [ block 0 | block 1 | ... | block capacity-1 ]   each block_bytes long

A block is the aggregated KV of `block_size` tokens for all layers of the instance (see
services/worker/kv_cache.py), so a run of consecutive block ids is one contiguous byte
range and moves as one copy or one message.

Kinds:
- `CudaRegion` (cuda_region.py, optional): device memory the daemon allocates and the worker
  maps through a CUDA IPC handle.
- `ShmRegion`: a POSIX shared-memory segment (/dev/shm). The MemPool daemon creates it; the
  worker and same-host peers attach by name and read/write the same bytes (no copy). The
  segment is created at its maximal size, but tmpfs commits pages only when they are
  touched, so `capacity_blocks` (what the allocator may hand out) can grow at run time up
  to `max_blocks` without remapping: the elastic KV region KunServe lends memory to.
- `HostRegion`: private anonymous memory of the daemon (the host/DRAM tier for swapped-out
  blocks); nobody else maps it.

Pre-faulting: a page first touched through a mapping costs a page fault (and, the first
time anywhere, tmpfs zeroing it): ~2,000 faults per 8 MiB of KV. A transfer or a forward
pass that writes fresh blocks would pay them inline (a 7 MiB hand-off took 8-30 ms instead
of ~3 ms). `populate` maps a range in one madvise(MADV_POPULATE_WRITE) call (Linux 5.14+;
elsewhere it does nothing and pages fault in as before). The daemon populates the capacity
it hands out (committing that memory up front, as a GPU pool would); attachers populate
what they know is in use; the shm sender populates each transfer's destination runs.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
from multiprocessing import resource_tracker, shared_memory
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch


class Region:
    """Byte view of `max_blocks` blocks of `block_bytes` each.

    `buffer`/`array` are host views of the bytes; a region in device memory (`CudaRegion`)
    has none (`on_host` is False) and is reached through `tensor()` and `host_view()`.
    """

    kind = "base"
    on_host: ClassVar[bool] = True
    split = 1  # sub-blocks per whole block (KunServe split mode, `set_split`)

    def __init__(self, buffer: memoryview, block_bytes: int, max_blocks: int, capacity_blocks: int):
        if block_bytes <= 0 or max_blocks <= 0:
            raise ValueError("a region needs a positive block size and block count")
        if not 0 < capacity_blocks <= max_blocks:
            raise ValueError(f"capacity {capacity_blocks} outside (0, {max_blocks}]")
        if len(buffer) < block_bytes * max_blocks:
            raise ValueError(f"buffer of {len(buffer)} bytes is smaller than {max_blocks} blocks")
        self.buffer = buffer
        self.block_bytes = block_bytes
        self.max_blocks = max_blocks
        self.capacity_blocks = capacity_blocks
        self.array = np.frombuffer(buffer, dtype=np.uint8, count=block_bytes * max_blocks)
        self._tensor: torch.Tensor | None = None

    def tensor(self) -> torch.Tensor:
        """The region as a 1-D torch uint8 tensor over the same memory (torch is imported on
        first use: the daemon loads it only for the collective transports)."""
        if self._tensor is None:
            import torch

            self._tensor = torch.frombuffer(
                self.buffer, dtype=torch.uint8, count=self.block_bytes * self.max_blocks
            )
        return self._tensor

    def host_view(self, first: int, count: int = 1) -> memoryview:
        """Blocks [first, first + count) readable on the host: the region's own bytes here,
        a copy for device memory."""
        return self.blocks(first, count)

    def grow(self, capacity_blocks: int) -> None:
        if not self.capacity_blocks <= capacity_blocks <= self.max_blocks:
            raise ValueError(
                f"can grow from {self.capacity_blocks} up to {self.max_blocks} blocks, not to {capacity_blocks}"
            )
        self.capacity_blocks = capacity_blocks

    def set_split(self, g: int) -> None:
        """Re-view the same bytes as blocks of `1/g` of a whole block (split mode: block b is
        sub-blocks b*g .. b*g+g-1), or back to whole blocks with g = 1. In place: every
        holder of this object (a transport's receiver, the daemon) sees the new geometry.

        `block_bytes * max_blocks` (the reservation's bytes) never changes. Merging back
        rounds the capacity up to whole blocks (it then still covers every id handed out).
        Refused (ValueError, nothing changed) from one split factor straight to another, or
        when g does not divide the block bytes."""
        if g < 1:
            raise ValueError(f"split factor must be >= 1, got {g}")
        if g == self.split:
            return
        if g != 1 and self.split != 1:
            raise ValueError(f"region is split into {self.split}: merge before splitting into {g}")
        if g != 1:
            if self.block_bytes % g:
                raise ValueError(f"{self.block_bytes}-byte blocks do not split into {g} parts")
            self.block_bytes //= g
            self.max_blocks *= g
            self.capacity_blocks *= g
        else:
            s = self.split
            self.block_bytes *= s
            self.max_blocks //= s
            self.capacity_blocks = -(-self.capacity_blocks // s)
        self.split = g

    def blocks(self, first: int, count: int = 1) -> memoryview:
        """Bytes of blocks [first, first + count)."""
        if first < 0 or count < 0 or first + count > self.max_blocks:
            raise IndexError(
                f"blocks [{first}, {first + count}) outside the region of {self.max_blocks}"
            )
        start = first * self.block_bytes
        return self.buffer[start : start + count * self.block_bytes]

    def close(self) -> None:
        self._tensor = None
        self.array = np.empty(0, dtype=np.uint8)
        self.buffer.release()


# Segments this process created: attaching one of them must leave its tracker entry alone.
_CREATED: set[str] = set()

# MADV_POPULATE_WRITE is 23 on Linux; Python names it only from 3.13 on.
_POPULATE_WRITE: int | None = getattr(
    mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None
)


class HostRegion(Region):
    kind = "host"

    def __init__(self, block_bytes: int, max_blocks: int):
        self._storage = bytearray(block_bytes * max_blocks)
        super().__init__(memoryview(self._storage), block_bytes, max_blocks, max_blocks)


class ShmRegion(Region):
    kind = "shm"

    def __init__(
        self,
        shm: shared_memory.SharedMemory,
        block_bytes: int,
        max_blocks: int,
        capacity_blocks: int,
        owner: bool,
    ):
        self.shm = shm
        self.owner = owner
        assert shm.buf is not None
        super().__init__(shm.buf, block_bytes, max_blocks, capacity_blocks)

    @property
    def name(self) -> str:
        return self.shm.name

    @classmethod
    def create(
        cls,
        block_bytes: int,
        max_blocks: int,
        capacity_blocks: int | None = None,
        name: str | None = None,
        *,
        prefault: bool = False,
    ) -> ShmRegion:
        """A new segment of `max_blocks`; `prefault` populates the first `capacity_blocks`."""
        _check_room(block_bytes * (capacity_blocks or max_blocks))
        shm = shared_memory.SharedMemory(name=name, create=True, size=block_bytes * max_blocks)
        _CREATED.add(shm.name)
        region = cls(shm, block_bytes, max_blocks, capacity_blocks or max_blocks, owner=True)
        if prefault:
            region.populate(0, region.capacity_blocks)
        return region

    @classmethod
    def attach(
        cls, name: str, block_bytes: int, max_blocks: int, *, prefault_blocks: int = 0
    ) -> ShmRegion:
        """Map a segment another process created (populating its first `prefault_blocks`).
        The creator alone unlinks it."""
        shm = shared_memory.SharedMemory(name=name, create=False)
        # Python < 3.13 registers attached segments with the resource tracker too, which
        # would unlink the creator's segment when this process exits.
        if shm.name not in _CREATED:
            with contextlib.suppress(Exception):
                resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        region = cls(shm, block_bytes, max_blocks, max_blocks, owner=False)
        region.populate(0, prefault_blocks)
        return region

    def populate(self, first: int, count: int) -> bool:
        """Map blocks [first, first + count) into this process now (tmpfs allocates any
        page nobody touched yet), so that writes to them take no page faults. Best effort:
        False where the kernel cannot (the pages then fault in on first touch)."""
        count = min(count, self.max_blocks - first)
        if count <= 0 or first < 0:
            return False
        return self.populate_bytes(first * self.block_bytes, count * self.block_bytes)

    def populate_bytes(self, offset: int, nbytes: int) -> bool:
        """`populate` for bytes [offset, offset + nbytes) of the segment (a sender that
        knows the destination's geometry from its endpoint, not from this mapping)."""
        global _POPULATE_WRITE
        nbytes = min(nbytes, len(self.array) - offset)
        if _POPULATE_WRITE is None or nbytes <= 0 or offset < 0:
            return False
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = offset + nbytes
        try:
            self.shm._mmap.madvise(_POPULATE_WRITE, start, end - start)  # type: ignore[attr-defined]
        except (OSError, ValueError, AttributeError):
            _POPULATE_WRITE = None  # an older kernel: do not ask again
            return False
        return True

    def close(self) -> None:
        super().close()
        self.shm.close()
        if self.owner:
            _CREATED.discard(self.shm.name)
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()


def copy_blocks(src: Region, src_first: int, dst: Region, dst_first: int, count: int) -> None:
    """Copy `count` consecutive blocks between two regions of the same block size (swap
    between tiers): numpy between host regions, torch when either side is device memory."""
    if src.block_bytes != dst.block_bytes:
        raise ValueError(f"block sizes differ: {src.block_bytes} and {dst.block_bytes} bytes")
    bb = src.block_bytes
    if src.on_host and dst.on_host:
        np.copyto(
            dst.array[dst_first * bb : (dst_first + count) * bb],
            src.array[src_first * bb : (src_first + count) * bb],
        )
        return
    dst.tensor()[dst_first * bb : (dst_first + count) * bb].copy_(
        src.tensor()[src_first * bb : (src_first + count) * bb]
    )


SHM_DIR = "/dev/shm"


def _check_room(nbytes: int, folder: str = SHM_DIR) -> None:
    """Refuse a segment whose capacity the shared-memory filesystem cannot hold: segments
    are sparse, so an undersized /dev/shm (a container's default is 64 MiB) would only
    show later, as a SIGBUS when a block is first written. Best effort: others' untouched
    pages are not counted as used."""
    try:
        st = os.statvfs(folder)
    except OSError:  # no /dev/shm (not Linux): nothing to judge
        return
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise MemoryError(
            f"{folder} has {free / 2**20:.0f} MiB free but this KV region needs "
            f"{nbytes / 2**20:.0f} MiB: enlarge it (e.g. `docker run --shm-size=1g`) or "
            "lower mempool.device_memory_bytes"
        )
