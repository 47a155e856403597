"""KunServe split mode on running daemons, over the wire (design/kunserve-plan.md §4.5):
`Split` re-views the shm region in place and grows into the budget, ids and sizes are in
sub-blocks, KV moves byte-exactly between two daemons split alike (shm and tcp) and is
refused between daemons split differently, `Merge` only when every aligned run agrees,
`Shrink` reports the live ids above its ceiling; check_integrity after every step. Also
the pure pieces the daemon relies on: `Region.set_split` and the budget in sub-blocks."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ErrorKind
from common.protocol import mempool as mp
from common.sockets import RpcError
from services.mempool.budget import BudgetError, MemoryBudget
from services.mempool.region import ShmRegion
from tests.daemons import Daemon, SpawnDaemon, assert_clean
from tests.mempool.helpers import tiny_sizes

PARAMS, BB = tiny_sizes()  # tiny preset: 4 layers, 32 KiB blocks
HALF = BB // 2


async def region_of(d: Daemon) -> ShmRegion:
    """The daemon's device region as its worker would map it now (current block size)."""
    info = await d.client.info()
    return ShmRegion.attach(info.device_name, info.block_bytes, info.device_max_blocks)


async def intact(*daemons: Daemon) -> None:
    for d in daemons:
        check = await d.client.check_integrity()
        assert check.ok, f"{d.instance_id}: {check.message}"


async def refused(call: object, kind: ErrorKind, match: str) -> None:
    with pytest.raises(RpcError, match=match) as exc:
        await call  # type: ignore[misc]
    assert exc.value.kind == kind


# ------------------------------------------------------------------ pure pieces
def test_region_set_split_views_the_same_bytes_in_place() -> None:
    region = ShmRegion.create(64, 4, 3)
    try:
        region.array[:] = np.arange(256, dtype=np.uint8)
        whole = bytes(region.blocks(1))
        region.set_split(2)
        assert (region.block_bytes, region.max_blocks, region.capacity_blocks) == (32, 8, 6)
        assert bytes(region.blocks(2)) + bytes(region.blocks(3)) == whole
        with pytest.raises(ValueError, match="merge before"):
            region.set_split(4)
        region.grow(7)  # an odd number of sub-blocks: merging rounds up to whole blocks
        region.set_split(1)
        assert (region.block_bytes, region.max_blocks, region.capacity_blocks) == (64, 4, 4)
        assert bytes(region.blocks(1)) == whole
        with pytest.raises(ValueError, match="do not split"):
            region.set_split(3)
        assert region.split == 1 and region.block_bytes == 64
    finally:
        region.close()


def test_budget_counts_sub_blocks_in_split_mode() -> None:
    b = MemoryBudget(budget=10_500, param_bytes=3_000, block_bytes=1_000)
    assert b.kv_capacity_blocks() == 7
    b.set_split(2)
    assert (b.unit_bytes, b.kv_capacity_blocks(), b.max_blocks) == (500, 15, 21)
    assert b.check(15) == "" and "budget broken" in b.check(16)
    assert b.set_params(1_000, 15) == 19  # fewer params: grows, in sub-blocks
    with pytest.raises(BudgetError, match="exceed the budget"):
        b.set_params(1_100, 19)  # 1,100 + 19 * 500 > 10,500
    with pytest.raises(ValueError, match="do not split"):
        b.set_split(3)
    b.set_split(1)
    assert b.check(9) == "" and "budget broken" in b.check(10)


# ---------------------------------------------------------------- on a daemon
@pytest.mark.integration
async def test_split_over_rpc_grows_into_the_budget(spawn_daemon: SpawnDaemon) -> None:
    budget = PARAMS + 8 * BB + HALF + 100  # 8 whole blocks fit, 17 half blocks
    d = await spawn_daemon("split", budget_bytes=budget)
    info = await d.client.info()
    assert (info.split, info.block_bytes, info.device_blocks) == (1, BB, 8)
    held = await d.client.alloc_mem(2, owner="w")
    whole = await region_of(d)
    try:
        pattern = np.random.default_rng(1).integers(0, 256, 2 * BB, dtype=np.uint8).tobytes()
        whole.blocks(held[0], 2)[:] = pattern
    finally:
        whole.close()

    s = await d.client.split(2)  # grow=True: the half block the budget had left is added
    assert (s.split, s.block_bytes, s.capacity_blocks, s.max_blocks) == (
        2,
        HALF,
        17,
        2 * info.device_max_blocks,
    )
    assert (s.budget_bytes, s.param_bytes, s.pending_shrink) == (budget, PARAMS, [])
    await intact(d)
    info = await d.client.info()
    assert (info.split, info.block_bytes, info.device_blocks) == (2, HALF, 17)
    stats = await d.client.stats()
    assert (stats.split, stats.block_bytes, stats.capacity["device"]) == (2, HALF, 17)
    assert stats.client["device"] == 4  # each held block is now two sub-blocks of "w"

    # The worker dropped layers and reports fewer parameters: capacity grows into them.
    r = await d.client.set_params(PARAMS - 10 * BB)
    assert (r.device_blocks, r.block_bytes) == (37, HALF)  # (18.5 blocks + 100 B) / half
    await intact(d)
    await refused(d.client.set_params(PARAMS), ErrorKind.REFUSED, "exceed the budget")
    await refused(d.client.call(mp.Grow(38)), ErrorKind.REFUSED, "budget")
    assert (await d.client.info()).device_blocks == 37

    # Sub-block units: the same bytes, re-viewed in place; new ids from the grown range.
    sub = await region_of(d)
    try:
        first = held[0] * 2
        assert bytes(sub.blocks(first, 4)) == pattern
        more = await d.client.alloc_mem(33, owner="w2")
        assert len(set(more) | set(range(first, first + 4))) == 37 and max(more) == 36
        sub.blocks(36)[:] = b"\x07" * HALF  # the grown range is mapped and writable
        await refused(d.client.alloc_mem(1), ErrorKind.OUT_OF_MEMORY, "1 blocks asked")
        await d.client.free_mem(more)
    finally:
        sub.close()
    await d.client.free_mem(list(range(first, first + 4)))
    await assert_clean(d)


@pytest.mark.integration
@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_sub_blocks_move_between_daemons_split_alike(
    spawn_daemon: SpawnDaemon, transport: str
) -> None:
    a = await spawn_daemon("a", device_blocks=8, transports=[transport])
    b = await spawn_daemon("b", device_blocks=8, transports=[transport])
    rng = np.random.default_rng(2)
    # One whole-block transfer first: the sender then holds b's segment in whole blocks.
    src = await a.client.alloc_mem(1, owner="w")
    ra = await region_of(a)
    try:
        ra.blocks(src[0])[:] = rng.integers(0, 256, BB, dtype=np.uint8).tobytes()
    finally:
        ra.close()
    t = await a.client.transfer(b.address, src, [], transport=transport, owner="d", checksum=True)
    await a.client.free_mem(src)
    await b.client.free_mem(t.dst_ids)

    for d in (a, b):
        assert (await d.client.split(2)).block_bytes == HALF
    src = await a.client.alloc_mem(3, owner="w")  # three sub-blocks: 1.5 whole blocks
    ra, rb = await region_of(a), await region_of(b)
    try:
        data = {s: rng.integers(0, 256, HALF, dtype=np.uint8).tobytes() for s in src}
        for s, payload in data.items():
            ra.blocks(s)[:] = payload
        t = await a.client.transfer(
            b.address, src, [], transport=transport, owner="d", checksum=True
        )
        assert t.transport == transport and t.nbytes == 3 * HALF and max(t.dst_ids) < 16
        for s, dst in zip(src, t.dst_ids, strict=True):
            assert bytes(rb.blocks(dst)) == data[s]
        # Into sub-blocks the receiver's client chose: odd ones, not aligned to a block.
        mine = await b.client.alloc_mem(2, owner="d2")
        await a.client.transfer(b.address, src[1:], mine, transport=transport, checksum=True)
        assert [bytes(rb.blocks(x)) for x in mine] == [data[s] for s in src[1:]]
        await intact(a, b)
        await b.client.free_mem(t.dst_ids + mine)
    finally:
        ra.close()
        rb.close()
    await a.client.free_mem(src)
    await assert_clean(a, b)


@pytest.mark.integration
async def test_a_transfer_between_split_modes_is_refused(spawn_daemon: SpawnDaemon) -> None:
    a = await spawn_daemon("split-a", device_blocks=8)
    b = await spawn_daemon("whole-b", device_blocks=8)
    await a.client.split(2)
    src_a = await a.client.alloc_mem(2, owner="w")
    src_b = await b.client.alloc_mem(1, owner="w")
    for transport in ("shm", "tcp"):
        await refused(
            a.client.transfer(b.address, src_a, [], transport=transport, owner="d"),
            ErrorKind.REFUSED,
            "block size mismatch",
        )
        await refused(
            b.client.transfer(a.address, src_b, [], transport=transport, owner="d"),
            ErrorKind.REFUSED,
            "block size mismatch",
        )
    for d, held in ((a, 2), (b, 1)):
        st = await d.client.stats()
        assert st.client["device"] == held and st.pending_transfers == 0
    await intact(a, b)
    await a.client.free_mem(src_a)
    await b.client.free_mem(src_b)
    await assert_clean(a, b)


@pytest.mark.integration
async def test_merge_only_when_every_aligned_run_agrees(spawn_daemon: SpawnDaemon) -> None:
    d = await spawn_daemon("merge", device_blocks=8)
    held = await d.client.alloc_mem(2, owner="w")  # blocks 0, 1
    await d.client.split(2)  # sub-blocks 0..3 of "w"
    await d.client.free_mem([1])  # run 0..1 now half free
    await refused(d.client.merge(), ErrorKind.REFUSED, "mixed")
    assert (await d.client.info()).split == 2  # nothing changed
    await intact(d)
    other = await d.client.alloc_mem(1, owner="x")  # sub-block 4: run 4..5 half used
    await d.client.free_mem([0])
    await refused(d.client.merge(), ErrorKind.REFUSED, "mixed")
    await d.client.free_mem(other)
    await intact(d)

    s = await d.client.merge()
    assert (s.split, s.block_bytes, s.capacity_blocks) == (1, BB, 8)
    info = await d.client.info()
    assert (info.split, info.block_bytes, info.device_blocks) == (1, BB, 8)
    st = await d.client.stats()
    assert st.client["device"] == 1  # sub-blocks 2, 3 of "w" are whole block 1 again
    await intact(d)
    await d.client.free_mem([held[1]])
    await assert_clean(d)


@pytest.mark.integration
async def test_shrink_reports_the_live_ids_above_the_ceiling(spawn_daemon: SpawnDaemon) -> None:
    d = await spawn_daemon("shrink", device_blocks=8)
    await d.client.split(2)  # 16 sub-blocks
    ids = await d.client.alloc_mem(10, owner="w")  # 0..9
    s = await d.client.shrink(7)
    assert s.pending_shrink == [7, 8, 9] and s.capacity_blocks == 16
    await intact(d)
    # A ceiling inside a whole block: merging would have to split it again.
    await refused(d.client.merge(), ErrorKind.REFUSED, "ceiling 7 is not a whole number")
    s = await d.client.shrink(6)
    assert s.pending_shrink == [6, 7, 8, 9]
    await intact(d)
    await refused(d.client.alloc_mem(1), ErrorKind.OUT_OF_MEMORY, "1 blocks asked")
    await refused(d.client.shrink(12), ErrorKind.REFUSED, "ceiling is 6")
    await d.client.free_mem(ids[6:])
    assert (await d.client.info()).device_blocks == 6  # the shrink is done
    await intact(d)
    s = await d.client.merge()
    assert (s.split, s.capacity_blocks, s.pending_shrink) == (1, 3, [])
    await d.client.call(mp.Grow(8))  # the region still covers it: no remap
    assert (await d.client.info()).device_blocks == 8
    await intact(d)
    await d.client.free_mem([0, 1, 2])
    await assert_clean(d)


@pytest.mark.integration
async def test_bad_split_requests_get_clear_errors(spawn_daemon: SpawnDaemon) -> None:
    d = await spawn_daemon("bad", device_blocks=8)
    for g in (3, 1, 0, -2, 8):  # tiny has 4 layers
        await refused(d.client.split(g), ErrorKind.BAD_REQUEST, "divide the 4 layers")
    await refused(d.client.merge(), ErrorKind.REFUSED, "not split")
    await d.client.split(4)
    await refused(d.client.split(2), ErrorKind.REFUSED, "already split into 4")
    info = await d.client.info()
    assert (info.split, info.block_bytes, info.device_blocks) == (4, BB // 4, 32)
    await intact(d)
    await d.client.merge()
    assert (await d.client.info()).split == 1
    assert len(await d.client.alloc_mem(8, owner="w")) == 8  # still serving
    await d.client.release_owner("w")
    await assert_clean(d)


@pytest.mark.integration
async def test_chown_passes_blocks_to_a_group_and_back(spawn_daemon: SpawnDaemon) -> None:
    d = await spawn_daemon("chown", device_blocks=8)
    mine = await d.client.alloc_mem(3, owner="w0")
    await d.client.split(2)
    subs = [b * 2 + j for b in mine for j in range(2)]
    await refused(d.client.chown(subs, "group:g1", expect="w1"), ErrorKind.BAD_REQUEST, "w1")
    await refused(d.client.chown([15], "group:g1"), ErrorKind.BAD_REQUEST, "not allocated")
    assert (await d.client.stats()).client["device"] == 6  # nothing changed
    assert await d.client.chown(subs[:4], "group:g1", expect="w0") == 4
    assert await d.client.release_owner("w0") == 2  # only what w0 still holds
    assert await d.client.chown(subs[:2], "w1", expect="group:g1") == 2
    assert await d.client.release_owner("group:g1") == 2
    await intact(d)
    assert await d.client.release_owner("w1") == 2
    await d.client.merge()
    await assert_clean(d)
