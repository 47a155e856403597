"""MemPool split mode (KunServe): client ownership carries over to sub-blocks, the device
index is emptied and read-only while split, and every refusal leaves the pool unchanged."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from services.mempool.pool import MemPool, MemPoolError, OutOfMemory
from services.mempool.prompt_tree import Tier
from tests.mempool.helpers import BS, Memory


def make_pool(device: int = 8, host: int = 0, **kw: Any) -> tuple[MemPool, Memory]:
    mem = Memory()
    tick = itertools.count()
    pool = MemPool(BS, device, host, copy_blocks=mem.copy, clock=lambda: float(next(tick)), **kw)
    return pool, mem


def cache(pool: MemPool, tokens: list[int]) -> list[int]:
    ids = pool.alloc_mem(-(-len(tokens) // BS), owner="w")
    return pool.insert(tokens, ids).index_block_ids


def state(pool: MemPool) -> tuple[Any, ...]:
    a = pool.alloc[Tier.DEVICE]
    return (
        a.capacity,
        a.split_factor,
        a.free_ids(),
        sorted(pool.client[Tier.DEVICE].items()),
        pool.tree.num_blocks[Tier.DEVICE],
    )


def refused(pool: MemPool, call: Any, match: str, exc: type[Exception] = MemPoolError) -> None:
    before = state(pool)
    with pytest.raises(exc, match=match):
        call()
    assert state(pool) == before
    pool.check_integrity()


def test_split_carries_client_ownership_and_empties_the_device_index() -> None:
    pool, _ = make_pool(device=6, host=4)
    a = pool.alloc_mem(1, owner="a")
    b = pool.alloc_mem(1, owner="b")
    cache(pool, [1] * 8)  # two device index blocks
    pool.split(2)
    pool.check_integrity()
    assert pool.split_factor == 2 and pool.alloc[Tier.DEVICE].capacity == 12
    assert pool.tree.num_blocks[Tier.DEVICE] == 0 and pool.tree.num_blocks[Tier.HOST] == 2
    owners = dict(pool.client[Tier.DEVICE].items())
    assert owners == {a[0] * 2: "a", a[0] * 2 + 1: "a", b[0] * 2: "b", b[0] * 2 + 1: "b"}
    pool.free_mem([a[0] * 2])
    refused(pool, pool.merge, "mixed")
    pool.free_mem([a[0] * 2 + 1])
    pool.merge()
    pool.check_integrity()
    assert dict(pool.client[Tier.DEVICE].items()) == {b[0]: "b"}
    assert pool.alloc[Tier.DEVICE].capacity == 6


def test_split_refusals() -> None:
    pool, _ = make_pool(device=4)
    ids = cache(pool, [1] * 4)
    refused(pool, lambda: pool.split(0), "cannot split")
    m = pool.match([1] * 4, promote=False)
    refused(pool, lambda: pool.split(2), "pinned")
    pool.release(m.handle)
    c = pool.alloc_mem(1, owner="t")
    pool.mark_busy(c)
    refused(pool, lambda: pool.split(2), "in transfer")
    pool.unmark_busy(c)
    pool.split(2)
    assert not set(ids) & set(pool.client[Tier.DEVICE])
    refused(pool, lambda: pool.split(2), "split factor is 2")


def test_merge_refusals() -> None:
    pool, _ = make_pool(device=4)
    refused(pool, pool.merge, "not split")
    pool.split(2)
    x = pool.alloc_mem(1, owner="x")
    y = pool.alloc_mem(1, owner="y")
    assert (x, y) == ([0], [1])
    refused(pool, pool.merge, "several owners")
    pool.free_mem(x + y)
    run = pool.alloc_aligned(1, owner="x")[0]
    assert run == [2, 3]
    pool.mark_busy(run)
    refused(pool, pool.merge, "in transfer")
    pool.unmark_busy(run)
    pool.merge()
    assert dict(pool.client[Tier.DEVICE].items()) == {1: "x"}


def test_device_index_is_read_only_while_split() -> None:
    pool, _ = make_pool(device=4, host=4)
    cache(pool, [2] * 4)
    pool.split(2)
    ids = pool.alloc_mem(2, owner="w")
    refused(pool, lambda: pool.insert([3] * 8, ids), "read-only")
    m = pool.match([2] * 4)  # on the host only: no promotion while split
    assert m.num_tokens == 0
    m = pool.match([2] * 4, promote=False)
    assert m.num_tokens == 4 and m.tiers == [Tier.HOST]
    pool.release(m.handle)
    pool.check_integrity()


def test_alloc_aligned_and_shrink_for_the_move_home() -> None:
    pool, _ = make_pool(device=4)
    pool.split(2)
    pool.alloc_mem(1, owner="w")  # breaks run 0..1
    runs = pool.alloc_aligned(2, owner="home")
    assert runs == [[2, 3], [4, 5]]
    refused(pool, lambda: pool.alloc_aligned(2), "aligned runs", OutOfMemory)
    assert pool.shrink(4) == [4, 5]
    refused(pool, lambda: pool.shrink(5), "cannot shrink")
    pool.check_integrity()
    assert pool.pending_shrink == [4, 5]
    pool.free_mem(runs[1])
    assert pool.pending_shrink == [] and pool.alloc[Tier.DEVICE].capacity == 4
    pool.free_mem([0])
    pool.merge()
    pool.check_integrity()
    assert dict(pool.client[Tier.DEVICE].items()) == {1: "home"}


def test_shrink_leaves_index_blocks_above_until_evicted() -> None:
    pool, _ = make_pool(device=4)
    pool.alloc_mem(2, owner="w")
    idx = cache(pool, [5] * 8)  # blocks 2, 3
    assert pool.shrink(2) == []  # no client block above: index ones go when evicted
    assert pool.pending_shrink == idx
    pool.check_integrity()
    with pytest.raises(OutOfMemory):
        pool.alloc_mem(1)  # evicts one, but it retires instead of coming back
    assert len(pool.pending_shrink) == 1  # the leaf end of the prompt went
    assert pool.evict(1) == 1
    assert pool.pending_shrink == [] and pool.alloc[Tier.DEVICE].capacity == 2
    pool.check_integrity()
