"""The device tier on a GPU: KV memory the daemon allocates and the worker maps by CUDA IPC.

    daemon:  ptr = cudaMalloc(max_blocks * block_bytes)      (one allocation, never moved)
             handle = cudaIpcGetMemHandle(ptr)  ──InfoReply.device_name──▶ worker
    worker:  ptr' = cudaIpcOpenMemHandle(handle)  -> the same bytes, computed on in place

The allocation is made with the raw runtime call, not through a caching allocator, so the
pointer is the base of its own allocation: an IPC handle always maps the base, and an
offset inside a pooled block would be lost on the other side. Both sides wrap the pointer
as a cupy array and hand it to torch through `__cuda_array_interface__` (no copy).

Unlike tmpfs, cudaMalloc commits the whole reservation at once: `max_blocks` is device
memory in use from the start, and `grow` only raises how much of it the allocator hands out.

With a memory budget B (`[mempool] budget_bytes`) the allocation is the instance arena
(kunserve-plan.md §4.4, services/worker/model/arena.py): exactly B bytes, `nbytes`, which
may exceed `max_blocks * block_bytes` by less than a block. KV blocks use its bottom, the
worker packs its parameters at its top (it maps all B bytes: `attach(..., nbytes=B)`), so a
parameter drop frees bytes the daemon hands out as KV. Device memory in use stays B.

Split mode (`Region.set_split`, inherited) only re-views the allocation in smaller
blocks: nothing is allocated or freed, so it needs no CUDA call and is never reached on CPU.

Optional: needs cupy (the `cuda` extra) and a CUDA device; `cuda_available()` is the guard.
Nothing here runs on a CPU-only machine (tests/mempool/test_cuda_region.py is gpu-marked).
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING

import numpy as np

from services.mempool.region import Region

if TYPE_CHECKING:
    import torch

# cudaIpcMemLazyEnablePeerAccess: let the opener's device reach the memory over NVLink/PCIe.
_IPC_LAZY_PEER_ACCESS = 1


@functools.cache
def cuda_available() -> bool:
    """cupy imports and sees a device (cupy-cuda12x imports without a GPU: ask it)."""
    try:
        import cupy

        return bool(cupy.cuda.is_available())
    except Exception:  # no cupy, or a broken driver/toolkit install
        return False


def parse_device(device: str) -> int:
    """'cuda' or 'cuda:N' -> N (0 for 'cuda')."""
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"not a CUDA device: {device!r} (expected 'cuda' or 'cuda:N')")
    return int(index or 0)


class CudaRegion(Region):
    """`max_blocks` blocks of device memory; `owner` allocated it, others opened its handle."""

    kind = "cuda"
    on_host = False

    def __init__(
        self,
        ptr: int,
        device_index: int,
        block_bytes: int,
        max_blocks: int,
        capacity_blocks: int,
        *,
        owner: bool,
        nbytes: int | None = None,
    ) -> None:
        if block_bytes <= 0 or max_blocks <= 0:
            raise ValueError("a region needs a positive block size and block count")
        nbytes = block_bytes * max_blocks if nbytes is None else nbytes
        if nbytes < block_bytes * max_blocks:
            raise ValueError(f"{nbytes:,} bytes cannot hold {max_blocks} blocks of {block_bytes:,}")
        if not 0 < capacity_blocks <= max_blocks:
            raise ValueError(f"capacity {capacity_blocks} outside (0, {max_blocks}]")
        import cupy
        import torch

        self.ptr = ptr
        self.device_index = device_index
        self.owner = owner
        self.block_bytes = block_bytes
        self.max_blocks = max_blocks
        self.capacity_blocks = capacity_blocks
        self.nbytes = nbytes  # the whole allocation: the blocks, or the budget's arena
        # No host view of device memory: `blocks()` refuses, `host_view()` copies.
        self.buffer = memoryview(b"")
        self.array = np.empty(0, dtype=np.uint8)
        memory = cupy.cuda.UnownedMemory(ptr, nbytes, self, device_id=device_index)
        self._cupy = cupy.ndarray(
            (nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0)
        )
        self._tensor = torch.as_tensor(self._cupy, device=f"cuda:{device_index}")

    @property
    def name(self) -> str:
        """What a worker needs to map this region: 'N:<IPC handle in hex>'."""
        import cupy

        with cupy.cuda.Device(self.device_index):
            handle = cupy.cuda.runtime.ipcGetMemHandle(self.ptr)
        return f"{self.device_index}:{bytes(handle).hex()}"

    @classmethod
    def create(
        cls,
        block_bytes: int,
        max_blocks: int,
        capacity_blocks: int | None,
        device: str,
        *,
        nbytes: int | None = None,
    ) -> CudaRegion:
        """Allocate and zero `max_blocks` blocks on `device` ('cuda' or 'cuda:N') as one
        allocation of `nbytes` (default: exactly the blocks; with a budget: B)."""
        import cupy

        index = parse_device(device)
        nbytes = block_bytes * max_blocks if nbytes is None else nbytes
        if nbytes < block_bytes * max_blocks:
            raise ValueError(f"{nbytes:,} bytes cannot hold {max_blocks} blocks of {block_bytes:,}")
        with cupy.cuda.Device(index):
            ptr = cupy.cuda.runtime.malloc(nbytes)
            cupy.cuda.runtime.memset(ptr, 0, nbytes)
            cupy.cuda.runtime.deviceSynchronize()
        return cls(
            ptr,
            index,
            block_bytes,
            max_blocks,
            capacity_blocks or max_blocks,
            owner=True,
            nbytes=nbytes,
        )

    @classmethod
    def attach(
        cls, name: str, block_bytes: int, max_blocks: int, *, nbytes: int | None = None
    ) -> CudaRegion:
        """Map the region another process created, from its `name`; `nbytes` (default: the
        blocks) views more of the allocation: the whole arena B of a budgeted daemon
        (`InfoReply.budget_bytes`), where the worker places its parameters."""
        import cupy

        index_text, _, handle_hex = name.partition(":")
        if not index_text.isdigit() or not handle_hex:
            raise ValueError(f"not a CUDA region name: {name!r} (expected 'N:<hex handle>')")
        index = int(index_text)
        with cupy.cuda.Device(index):
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(
                bytes.fromhex(handle_hex), _IPC_LAZY_PEER_ACCESS
            )
        return cls(ptr, index, block_bytes, max_blocks, max_blocks, owner=False, nbytes=nbytes)

    def tensor(self) -> torch.Tensor:
        assert self._tensor is not None, "region is closed"
        return self._tensor

    def blocks(self, first: int, count: int = 1) -> memoryview:
        raise TypeError("a CUDA region has no host view: use tensor() or host_view()")

    def host_view(self, first: int, count: int = 1) -> memoryview:
        if first < 0 or count < 0 or first + count > self.max_blocks:
            raise IndexError(
                f"blocks [{first}, {first + count}) outside the region of {self.max_blocks}"
            )
        start = first * self.block_bytes
        data = self.tensor()[start : start + count * self.block_bytes].cpu().numpy()
        return data.data

    def populate(self, first: int, count: int) -> bool:
        return True  # cudaMalloc commits at allocation

    def close(self) -> None:
        import cupy

        self._tensor = None
        self._cupy = None
        if not self.ptr:
            return
        ptr, self.ptr = self.ptr, 0
        with cupy.cuda.Device(self.device_index), contextlib.suppress(Exception):
            cupy.cuda.runtime.deviceSynchronize()
            if self.owner:
                cupy.cuda.runtime.free(ptr)
            else:
                cupy.cuda.runtime.ipcCloseMemHandle(ptr)
