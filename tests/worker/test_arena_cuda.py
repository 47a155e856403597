"""The instance arena on a GPU (kunserve-plan.md §4.4): the CPU checks of test_arena.py on a
CUDA byte tensor, then the real thing: a budgeted daemon's CUDA region is one allocation of
B bytes, the worker's parameters move into its top and KV grows to them.

gpu-marked and skipped without CUDA; `make gpu-check` runs them on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.kv_geometry import KVGeometry
from common.model.config import ModelConfig
from common.model.presets import resolve_model
from services.mempool.config import MempoolConfig
from services.worker.model.arena import place_in_region
from services.worker.model.loader import load_model
from tests.daemons import SpawnDaemon
from tests.worker import arena_checks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device: run on a GPU machine with `make gpu-check`",
    ),
]
MIB = 1 << 20


def needs_cupy() -> None:
    from services.mempool.cuda_region import cuda_available

    if not cuda_available():
        pytest.skip("cupy does not see a GPU (install the `cuda` extra; `make gpu-check`)")


def test_place_keeps_logits(tiny_folder: Path) -> None:
    arena_checks.check_place_keeps_logits(tiny_folder, "cuda")


def test_drop_compact_restore(tiny_folder: Path) -> None:
    arena_checks.check_drop_compact_restore(tiny_folder, "cuda")


def test_drop_restore_cycles_keep_invariants(tiny_folder: Path) -> None:
    arena_checks.check_cycles(tiny_folder, "cuda")


def test_refusals(tiny_folder: Path) -> None:
    arena_checks.check_refusals(tiny_folder, "cuda")


def test_budgeted_daemon_region_is_one_allocation_of_the_budget(tiny_folder: Path) -> None:
    """In process (a daemon process would add its own CUDA context to the count): the
    device tier of a budgeted cuda daemon costs B, in one allocation, and the worker's
    parameters fit at its top with the daemon's starting KV below them."""
    needs_cupy()
    from services.mempool.cuda_region import CudaRegion
    from services.mempool.memory import DaemonMemory

    budget = 64 * MIB + 12_345  # not a whole number of blocks: the arena is B, not the blocks
    cfg = MempoolConfig(device="cuda", budget_bytes=budget, tensor_memory_bytes=MIB)
    bb = cfg.geometry().block_bytes
    params = ModelConfig.from_folder(resolve_model("tiny")).param_bytes("float32")
    plan = cfg.memory_budget(bb, params)
    assert plan is not None
    model, _ = load_model(tiny_folder, device="cuda")
    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    memory = DaemonMemory(cfg, bb, plan.max_blocks, plan.kv_capacity_blocks(), 0)
    try:
        region = memory.device
        assert isinstance(region, CudaRegion)
        torch.cuda.synchronize()
        free1, _ = torch.cuda.mem_get_info()
        assert region.nbytes == budget and region.tensor().numel() == budget
        # One allocation of B: the driver rounds it up to its 2 MiB pages, nothing more.
        assert budget <= free0 - free1 <= budget + 4 * MIB
        kv_bytes = plan.kv_capacity_blocks() * bb
        arena = place_in_region(model, region.tensor(), kv_bytes)
        arena.check_integrity(model)
        assert arena.footprint == params and arena.kv_limit_blocks(bb) >= plan.kv_capacity_blocks()
        assert arena.kv_limit_blocks(bb) == (budget - params) // bb  # what SetParams grants
        del arena, model
    finally:
        memory.close()


async def test_worker_places_into_a_spawned_daemons_arena(
    spawn_daemon: SpawnDaemon, tiny_folder: Path
) -> None:
    """The worker side over CUDA IPC: attach over the whole budget, place, report the
    footprint; the daemon's grown capacity ends exactly below the parameters."""
    needs_cupy()
    from services.mempool.cuda_region import CudaRegion

    params = ModelConfig.from_folder(resolve_model("tiny")).param_bytes("float32")
    bb = KVGeometry.for_model_name("tiny", 16, "float32").block_bytes
    budget = params + 40 * bb + 777
    daemon = await spawn_daemon(
        "arena-cuda", device="cuda", budget_bytes=budget, transports=["cuda-ipc", "shm", "tcp"]
    )
    info = await daemon.client.info()
    region = CudaRegion.attach(
        info.device_name, info.block_bytes, info.device_max_blocks, nbytes=info.budget_bytes
    )
    try:
        model, _ = load_model(tiny_folder, device="cuda")
        arena = place_in_region(model, region.tensor(), info.device_blocks * info.block_bytes)
        reply = await daemon.client.set_params(arena.footprint)
        assert reply is not None
        info = await daemon.client.info()
        assert info.device_blocks == arena.kv_limit_blocks(bb) == 40
        arena.set_kv_bytes(info.device_blocks * bb)
        arena.check_integrity(model)
        assert (await daemon.client.check_integrity()).ok
        del arena, model
    finally:
        import gc

        gc.collect()
        region.close()
