"""The GPU device tier: a daemon's KV memory on the GPU shared with other processes by CUDA
IPC, swapped to the host tier and back, moved between daemons over cuda-ipc (and nccl where
two GPUs exist), and a prefill/decode pair of GPU workers giving the CPU reference's tokens.

gpu-marked: skipped where CUDA is absent (tests/conftest.py). The CPU twins of these paths
run everywhere: the collective code as gloo (test_collective.py), shm for cuda-ipc."""

from __future__ import annotations

import numpy as np
import pytest

from services.mempool.cuda_region import CudaRegion, cuda_available
from tests.daemons import Daemon, SpawnDaemon, SpawnWorker
from tests.worker.helpers import MakeEngine
from tests.worker.pd_helpers import Cluster, check_mode

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

GPU_TRANSPORTS = ["cuda-ipc", "nccl", "shm", "tcp"]  # device tier; tensor arena on the host


@pytest.fixture(autouse=True)
def _needs_cupy() -> None:
    if not cuda_available():
        pytest.skip("cupy does not see a GPU (install the `cuda` extra)")


async def region_of(d: Daemon) -> CudaRegion:
    info = await d.client.info()
    assert info.device_kind == "cuda"
    return CudaRegion.attach(info.device_name, info.block_bytes, info.device_max_blocks)


def fill(region: CudaRegion, blocks: list[int], seed: int) -> dict[int, bytes]:
    import torch

    rng = np.random.default_rng(seed)
    written = {}
    for b in blocks:
        data = rng.integers(0, 256, region.block_bytes, dtype=np.uint8)
        start = b * region.block_bytes
        region.tensor()[start : start + region.block_bytes].copy_(torch.from_numpy(data))
        written[b] = data.tobytes()
    return written


async def test_device_memory_is_shared_and_swaps_through_the_host_tier(
    spawn_daemon: SpawnDaemon,
) -> None:
    a = await spawn_daemon("a", device="cuda", transports=GPU_TRANSPORTS, host_blocks=16)
    region = await region_of(a)
    try:
        ids = await a.client.alloc_mem(4, owner="worker")
        written = fill(region, ids, seed=1)  # this process writes; the daemon owns the memory
        host = await a.client.swap_out(ids)  # device -> host, by the daemon's copy
        back = await a.client.swap_in(host)  # host -> device, into other blocks
        for b, data in zip(back, written.values(), strict=True):
            assert bytes(region.host_view(b)) == data
        await a.client.free_mem(back)
        assert (await a.client.check_integrity()).ok
    finally:
        region.close()


@pytest.mark.parametrize("transport", ["cuda-ipc", "nccl"])
async def test_transfer_with_insert_between_gpu_daemons(
    spawn_daemon: SpawnDaemon, transport: str
) -> None:
    import torch

    if transport == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL puts at most one rank on a GPU: needs two")
    a = await spawn_daemon("a", device="cuda:0", transports=GPU_TRANSPORTS)
    b_device = "cuda:1" if transport == "nccl" else "cuda:0"
    b = await spawn_daemon("b", device=b_device, transports=GPU_TRANSPORTS)
    ra, rb = await region_of(a), await region_of(b)
    try:
        src = await a.client.alloc_mem(5, owner="worker")
        written = fill(ra, src, seed=2)
        tokens = list(range(10, 10 + 16 * 4 + 5))
        t = await a.client.transfer_with_insert(
            b.address, tokens, src, pin_owner="decoder", transport=transport, checksum=True
        )
        assert t.transport == transport and t.num_indexed_tokens == 64
        for s, d in zip(src, t.dst_ids, strict=True):
            assert bytes(rb.host_view(d)) == written[s]
        await b.client.release(t.handle)
        await b.client.free_mem(t.tail_ids)
        await a.client.free_mem(src)
        for d in (a, b):
            assert (await d.client.check_integrity()).ok
    finally:
        ra.close()
        rb.close()


async def test_gpu_prefill_and_decode_give_the_cpu_reference_tokens(
    spawn_daemon: SpawnDaemon, spawn_worker: SpawnWorker, make_engine: MakeEngine
) -> None:
    gpu = {"device": "cuda", "transports": GPU_TRANSPORTS, "device_blocks": 96}
    pd = await spawn_daemon("p0-kv", **gpu)
    dd = await spawn_daemon("d0-kv", **gpu)
    worker = {"device": "cuda", "dtype": "float32", "transfer_timeout_s": 10}
    prefill = await spawn_worker("p0", pd.address, role="prefill", **worker)
    decode = await spawn_worker("d0", dd.address, role="decode", **worker)
    c = Cluster(prefill, decode, pd, dd)
    try:
        for i, mode in enumerate(["pd-basic", "pd-caching-3"]):
            await check_mode(c, make_engine(num_kv_blocks=128), mode, seed=40 + i)
    finally:
        c.close()
