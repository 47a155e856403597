"""Same-host transport between GPU regions: the sender maps the receiver's device memory by
its CUDA IPC handle and copies device to device (over NVLink/PCIe, or within one GPU).

The GPU counterpart of `shm` and it keeps the same rules (see shm.py): the receiver never
sees the copy, so completion is the commit itself; `cancel` cannot stop a copy in progress
(`cancel_fences_writes` is False), the sender starts no chunk after its deadline and waits
for each chunk's copy to finish before the next, so the daemon's reuse rule for cancelled
transfers holds. NCCL cannot put two ranks on one GPU; this transport can, which is what a
single-GPU host running a prefill and a decode instance needs.

Optional: needs cupy and a CUDA device (tests/mempool/test_cuda.py, gpu-marked).
"""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from services.mempool.cuda_region import CudaRegion
from services.mempool.region import Region
from services.mempool.transport.base import (
    CopyRun,
    Receiver,
    Sender,
    TransferError,
    TransferTimeout,
    check_runs,
    run_blocking,
)
from services.mempool.transport.shm import CHUNK_BYTES, ShmReceiver


class CudaIpcReceiver(ShmReceiver):
    name = "cuda-ipc"

    def __init__(self, region: Region) -> None:
        if not isinstance(region, CudaRegion):
            raise TypeError(f"cuda-ipc needs a CudaRegion, not {type(region).__name__}")
        Receiver.__init__(self, region)
        self.cuda_region = region
        self._expected = {}
        self._cancelled = set()

    async def start(self) -> dict[str, str]:
        return {"cuda-ipc": self.cuda_region.name, **self.geometry()}

    def geometry(self) -> dict[str, str]:
        # Per transfer (split mode changes it); the sender copies in bytes from these.
        return {
            "cuda-ipc.block_bytes": str(self.region.block_bytes),
            "cuda-ipc.max_blocks": str(self.region.max_blocks),
        }


class CudaIpcSender(Sender):
    name = "cuda-ipc"

    def __init__(
        self, retries: int = 2, *, chunk_bytes: int = CHUNK_BYTES, max_concurrent: int = 4
    ) -> None:
        super().__init__(retries)
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.chunk_bytes = chunk_bytes
        self._attached: dict[str, CudaRegion] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_concurrent, thread_name_prefix="cuda-ipc-tx")
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
            raise TransferError("the cuda-ipc sender is closed")
        try:
            name = endpoint["cuda-ipc"]
            block_bytes = int(endpoint["cuda-ipc.block_bytes"])
            max_blocks = int(endpoint["cuda-ipc.max_blocks"])
        except (KeyError, ValueError):
            raise ValueError(f"endpoint {dict(endpoint)} is not a cuda-ipc endpoint") from None
        if block_bytes != src.block_bytes or src.on_host:
            raise ValueError("cuda-ipc copies between GPU regions of the same block size")
        check_runs(src, [(run.src_block, run.num_blocks) for run in runs], "source")
        for run in runs:
            if run.dst_block < 0 or run.dst_block + run.num_blocks > max_blocks:
                raise ValueError(f"destination run {run} outside the peer's region")
        abandon = threading.Event()
        return await run_blocking(
            self._executor,
            self._copy,
            name,
            block_bytes,
            max_blocks,
            transfer_id,
            src,
            list(runs),
            time.monotonic() + timeout_s,
            checksum,
            abandon,
            timeout_s=timeout_s,
            abandon=abandon,
            what=f"cuda-ipc transfer {transfer_id}",
        )

    async def close(self) -> None:
        self._closed = True
        await asyncio.to_thread(self._executor.shutdown, True)
        with self._lock:
            attached = list(self._attached.values())
            self._attached.clear()
        for region in attached:
            region.close()

    def _attach(self, name: str, block_bytes: int, max_blocks: int) -> CudaRegion:
        # A restarted peer allocates anew and so has a new handle: a new name.
        with self._lock:
            region = self._attached.get(name)
            if region is None:
                region = self._attached[name] = CudaRegion.attach(name, block_bytes, max_blocks)
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
        import torch

        try:
            dst = self._attach(name, block_bytes, max_blocks)
        except Exception as e:  # a handle that no longer opens: the peer is gone
            raise TransferError(f"cuda-ipc transfer {transfer_id}: cannot map the peer: {e}") from e
        src_t, dst_t = src.tensor(), dst.tensor()
        torch.cuda.set_device(src_t.device)
        crc = 0
        bb = block_bytes
        for run in runs:
            src_start, dst_start, size = run.src_block * bb, run.dst_block * bb, run.num_blocks * bb
            for offset in range(0, size, self.chunk_bytes):
                if time.monotonic() >= deadline:
                    raise TransferTimeout(f"cuda-ipc transfer {transfer_id} timed out")
                if abandon.is_set() or self._closed:
                    raise TransferError(f"cuda-ipc transfer {transfer_id} abandoned")
                n = min(self.chunk_bytes, size - offset)
                chunk = src_t[src_start + offset : src_start + offset + n]
                dst_t[dst_start + offset : dst_start + offset + n].copy_(chunk)
                torch.cuda.synchronize(src_t.device)  # done before the deadline check again
                if checksum:
                    crc = zlib.crc32(chunk.cpu().numpy().data, crc)
        return crc if checksum else None
