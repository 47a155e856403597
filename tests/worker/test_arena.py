"""The instance arena on the CPU (kunserve-plan.md §4.4): parameters packed at the top of
one byte buffer, KV at its bottom, through place, drop + compact and restore. The same
checks run on a GPU in test_arena_cuda.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.worker.model.arena import ArenaError, ParamArena
from tests.worker import arena_checks


def test_place_keeps_logits(tiny_folder: Path) -> None:
    arena_checks.check_place_keeps_logits(tiny_folder, "cpu")


def test_drop_compact_restore(tiny_folder: Path) -> None:
    arena_checks.check_drop_compact_restore(tiny_folder, "cpu")


def test_drop_restore_cycles_keep_invariants(tiny_folder: Path) -> None:
    arena_checks.check_cycles(tiny_folder, "cpu")


def test_refusals(tiny_folder: Path) -> None:
    arena_checks.check_refusals(tiny_folder, "cpu")


@pytest.mark.parametrize("scratch", [1, 7, 1 << 20])
@pytest.mark.parametrize(("src", "dst", "n"), [(0, 10, 40), (3, 4, 50), (5, 60, 40), (0, 0, 9)])
def test_move_up_matches_a_copy(scratch: int, src: int, dst: int, n: int) -> None:
    buf = torch.randint(
        0, 256, (128,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    want = buf.clone()
    want[dst : dst + n] = buf[src : src + n].clone()
    arena = ParamArena(buf, scratch_bytes=scratch)
    if dst != src:
        arena._move_up(src, dst, n)
    assert torch.equal(buf, want)


def test_bad_buffers_are_refused() -> None:
    with pytest.raises(ArenaError, match="1-D uint8"):
        ParamArena(torch.zeros(64, dtype=torch.float32))
    with pytest.raises(ArenaError, match="power of two"):
        ParamArena(torch.zeros(64, dtype=torch.uint8), align=100)
    with pytest.raises(ArenaError, match="16-byte aligned"):
        ParamArena(torch.zeros(64, dtype=torch.uint8)[1:])
    with pytest.raises(ArenaError, match="kv_bytes"):
        ParamArena(torch.zeros(64, dtype=torch.uint8), kv_bytes=65)


def test_budgeted_gpu_daemon_allocates_the_budget() -> None:
    """The daemon's sizing (pure): on a GPU with a budget the device tier is one allocation
    of exactly B, the instance arena; otherwise just its blocks."""
    from services.mempool.config import MempoolConfig
    from services.mempool.cuda_region import CudaRegion
    from services.mempool.memory import device_region_bytes

    budget = 10 * 4096 + 100
    gpu = MempoolConfig(device="cuda:0", budget_bytes=budget)
    assert device_region_bytes(gpu, 4096, budget // 4096) == budget
    assert device_region_bytes(MempoolConfig(device="cuda"), 4096, 7) == 7 * 4096
    assert device_region_bytes(MempoolConfig(budget_bytes=budget), 4096, 10) == 10 * 4096
    with pytest.raises(ValueError, match="cannot hold"):  # refused before any CUDA call
        CudaRegion(0, 0, 4096, 10, 10, owner=False, nbytes=budget - 200)


def test_tied_follower_drop_and_restore(tiny_folder: Path, tmp_path: Path) -> None:
    """Tied word embeddings (one tensor is embedding and head): a follower drops it with its
    layers, compaction closes the gap, restore gives back the loaded model."""
    from services.worker.model.loader import load_model
    from tests.worker.helpers import tied_copy

    folder = tied_copy(tiny_folder, tmp_path / "tied")
    fresh, cfg = load_model(folder)
    model, _ = load_model(folder)
    arena = ParamArena(torch.zeros(model.param_bytes() + 4096, dtype=torch.uint8))
    arena.place(model)
    assert model.lm_head is None and arena.param_bytes == fresh.param_bytes()
    bottom = arena.param_bottom
    freed = model.drop_layers(range(2, cfg.num_layers), keep_embed=False, keep_head=False)
    assert arena.compact(model) == bottom + freed
    arena.check_integrity(model)
    assert arena.restore(model, folder) == freed
    arena.check_integrity(model)
    arena_checks.assert_equal_params(model, fresh)
