"""MemPool split mode (KunServe): client ownership carries over to sub-blocks, the device
index is emptied and read-only while split, and every refusal leaves the pool unchanged."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

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


# ---------------------------------------------------------------- properties
class PoolSplitMachine(RuleBasedStateMachine):
    """Random alloc / free / cache / match / split / merge / aligned alloc / shrink / grow
    against a model of device client ownership, with `check_integrity` after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.pool, _ = make_pool(device=6, host=3, device_max_blocks=10)
        self.owner: dict[int, str] = {}
        self.handles: list[int] = []

    @rule(n=st.integers(0, 3), who=st.sampled_from("abc"))
    def alloc(self, n: int, who: str) -> None:
        try:
            ids = self.pool.alloc_mem(n, owner=who)
        except OutOfMemory:
            return
        self.owner.update(dict.fromkeys(ids, who))

    @precondition(lambda self: self.owner)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.owner)), unique=True))
        self.pool.free_mem(ids)
        for b in ids:
            del self.owner[b]

    @rule(tokens=st.lists(st.integers(0, 1), min_size=1, max_size=9))
    def cache(self, tokens: list[int]) -> None:
        try:
            ids = self.pool.alloc_mem(-(-len(tokens) // BS), owner="req")
        except OutOfMemory:
            return
        if self.pool.split_factor != 1:
            refused(self.pool, lambda: self.pool.insert(tokens, ids), "read-only")
            self.pool.free_mem(ids)
            return
        self.pool.insert(tokens, ids)

    @rule(tokens=st.lists(st.integers(0, 1), min_size=4, max_size=9), promote=st.booleans())
    def match(self, tokens: list[int], promote: bool) -> None:
        m = self.pool.match(tokens, promote=promote)
        if m.handle:
            self.handles.append(m.handle)

    @precondition(lambda self: self.handles)
    @rule()
    def release(self) -> None:
        self.pool.release(self.handles.pop())

    @rule(g=st.integers(0, 3))
    def split(self, g: int) -> None:
        pool = self.pool
        if g < 1 or pool.split_factor != 1 or pool.tree.pinned_blocks[Tier.DEVICE]:
            refused(pool, lambda: pool.split(g), "cannot split")
            return
        pool.split(g)
        self.owner = {b * g + j: o for b, o in self.owner.items() for j in range(g)}

    @rule()
    def merge(self) -> None:
        pool, g = self.pool, self.pool.split_factor
        a = pool.alloc[Tier.DEVICE]
        ok = g != 1 and not a.capacity % g and not a.ceiling % g
        free, retired = a.free_ids(), a.retired_ids()
        for s in range(0, a.capacity, g) if ok else ():
            kinds = {
                "f" if b in free else "r" if b in retired else self.owner[b]
                for b in range(s, s + g)
            }
            ok = ok and len(kinds) == 1
        if not ok:
            refused(pool, pool.merge, "cannot merge")
            return
        pool.merge()
        self.owner = {b // g: o for b, o in self.owner.items() if b % g == 0}

    @rule(n=st.integers(0, 2), who=st.sampled_from("ab"))
    def alloc_aligned(self, n: int, who: str) -> None:
        try:
            runs = self.pool.alloc_aligned(n, owner=who)
        except OutOfMemory:
            return
        for run in runs:
            self.owner.update(dict.fromkeys(run, who))

    @rule(data=st.data())
    def shrink(self, data: st.DataObject) -> None:
        a = self.pool.alloc[Tier.DEVICE]
        target = data.draw(st.integers(0, a.ceiling + 1))
        if target > a.ceiling:
            refused(self.pool, lambda: self.pool.shrink(target), "cannot shrink")
            return
        assert self.pool.shrink(target) == sorted(b for b in self.owner if b >= target)

    @rule(data=st.data())
    def grow(self, data: st.DataObject) -> None:
        a = self.pool.alloc[Tier.DEVICE]
        cap = data.draw(st.integers(a.ceiling, a.max_blocks + 1))
        if cap > a.max_blocks:
            refused(self.pool, lambda: self.pool.grow(cap), "can grow")
            return
        self.pool.grow(cap)

    @invariant()
    def consistent(self) -> None:
        self.pool.check_integrity()
        assert dict(self.pool.client[Tier.DEVICE].items()) == self.owner
        if self.pool.split_factor != 1:
            assert self.pool.tree.num_blocks[Tier.DEVICE] == 0


PoolSplitMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
test_pool_split_machine = PoolSplitMachine.TestCase
