"""An instance's memory budget (invariant M: params + KV capacity <= budget): the pure
`MemoryBudget`, the config's checks, and a daemon that enforces it over the wire."""

from __future__ import annotations

import pytest

from common.errors import ErrorKind
from common.protocol import mempool as mp
from common.sockets import RpcError
from services.mempool.budget import BudgetError, MemoryBudget
from services.mempool.config import MempoolConfig
from tests.daemons import SpawnDaemon
from tests.mempool.helpers import tiny_sizes

BB = 1000  # block bytes of the pure tests


def test_capacity_is_what_fits_beside_the_params() -> None:
    b = MemoryBudget(budget=10_500, param_bytes=3_000, block_bytes=BB)
    assert b.max_blocks == 10 and b.kv_capacity_blocks() == 7
    assert b.check(7) == ""
    assert "budget broken" in b.check(8)
    assert MemoryBudget(budget=2_000, param_bytes=5_000, block_bytes=BB).kv_capacity_blocks() == 0


def test_set_params_grows_capacity_only() -> None:
    b = MemoryBudget(budget=10_500, param_bytes=3_000, block_bytes=BB)
    assert b.set_params(1_000, 7) == 9 and b.param_bytes == 1_000
    # Fewer blocks would fit beside more params, but the current KV still fits: kept.
    assert b.set_params(1_400, 9) == 9 and b.param_bytes == 1_400
    assert b.check(9) == ""


def test_set_params_that_breaks_the_budget_is_refused_and_changes_nothing() -> None:
    b = MemoryBudget(budget=10_500, param_bytes=1_000, block_bytes=BB)
    with pytest.raises(BudgetError) as exc:
        b.set_params(2_000, 9)  # 2,000 + 9,000 > 10,500: the KV cannot shrink
    assert exc.value.kind == ErrorKind.REFUSED and "exceed the budget" in str(exc.value)
    assert b.param_bytes == 1_000
    with pytest.raises(BudgetError) as exc:
        b.set_params(-1, 0)
    assert exc.value.kind == ErrorKind.BAD_REQUEST and b.param_bytes == 1_000


def test_bad_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="block_bytes"):
        MemoryBudget(budget=10, param_bytes=0, block_bytes=0)
    with pytest.raises(ValueError, match=">= 0"):
        MemoryBudget(budget=-1, param_bytes=0, block_bytes=BB)
    with pytest.raises(ValueError, match="budget_bytes must be >= 0"):
        MempoolConfig(budget_bytes=-1).validate()
    cfg = MempoolConfig(budget_bytes=5_000).validate()
    with pytest.raises(ValueError, match="no room for one KV block"):
        cfg.memory_budget(BB, 4_500)
    assert MempoolConfig().memory_budget(BB, 4_500) is None  # 0: no budget
    budget = cfg.memory_budget(BB, 3_000)
    assert budget is not None and budget.kv_capacity_blocks() == 2


def test_tiny_param_bytes_match_the_plan() -> None:
    assert tiny_sizes() == (3_218_944, 32 * 1024)  # design/kunserve-plan.md §4.2


@pytest.mark.integration
async def test_daemon_enforces_its_budget(spawn_daemon: SpawnDaemon) -> None:
    params, bb = tiny_sizes()
    budget = params + 64 * bb + 100
    d = await spawn_daemon("budgeted", budget_bytes=budget)
    info = await d.client.info()
    assert (info.budget_bytes, info.param_bytes) == (budget, params)  # the config's estimate
    assert info.device_blocks == 64 and info.device_max_blocks == budget // bb
    # The worker holds fewer: capacity grows into what its report frees.
    split = await d.client.set_params(params - 10 * bb)
    assert (split.param_bytes, split.device_blocks, split.budget_bytes) == (
        params - 10 * bb,
        74,
        budget,
    )
    assert len(await d.client.alloc_mem(74, owner="w")) == 74  # the new blocks are usable
    # More params than fit beside 74 blocks: refused, nothing changes.
    with pytest.raises(RpcError) as exc:
        await d.client.set_params(params)
    assert exc.value.kind == ErrorKind.REFUSED
    with pytest.raises(RpcError) as exc:  # a Grow past the budget too
        await d.client.call(mp.Grow(75))
    assert exc.value.kind == ErrorKind.REFUSED
    info = await d.client.info()
    assert (info.param_bytes, info.device_blocks) == (params - 10 * bb, 74)
    stats = await d.client.stats()
    assert (stats.budget_bytes, stats.param_bytes, stats.capacity["device"]) == (
        budget,
        params - 10 * bb,
        74,
    )
    assert (await d.client.check_integrity()).ok
    await d.client.release_owner("w")


@pytest.mark.integration
async def test_daemon_without_budget_is_sized_as_before(spawn_daemon: SpawnDaemon) -> None:
    d = await spawn_daemon("plain", device_blocks=8)
    info = await d.client.info()
    assert (info.budget_bytes, info.param_bytes, info.device_blocks) == (0, 0, 8)
    split = await d.client.set_params(12_345)  # recorded for display, no capacity change
    assert (split.budget_bytes, split.param_bytes, split.device_blocks) == (0, 12_345, 8)
    assert (await d.client.check_integrity()).ok
