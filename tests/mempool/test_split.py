"""BlockAllocator split mode (KunServe layer dropping) and shrink: each operation, every
refusal (the allocator is unchanged after one), and random sequences of alloc / free /
split / merge / shrink / grow with the integrity check after every step."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from services.mempool.allocator import AllocatorError, BlockAllocator


def snapshot(a: BlockAllocator) -> tuple[Any, ...]:
    return (
        a.capacity,
        a.ceiling,
        a.max_blocks,
        a.split_factor,
        list(a._free),
        a.retired_ids(),
        a.used_ids(),
    )


def refused(a: BlockAllocator, call: Any, match: str) -> None:
    before = snapshot(a)
    with pytest.raises(AllocatorError, match=match):
        call()
    assert snapshot(a) == before
    a.check_integrity()


# ---------------------------------------------------------------- split
def test_split_maps_free_and_used_blocks_to_sub_blocks() -> None:
    a = BlockAllocator(4, 6)
    assert a.allocate(2) == [0, 1]
    a.split(3)
    a.check_integrity()
    assert (a.capacity, a.ceiling, a.max_blocks, a.split_factor) == (12, 12, 18, 3)
    assert a.used_ids() == frozenset(range(6))
    assert list(a._free) == [6, 7, 8, 9, 10, 11]  # free list order kept
    assert a.allocate(2) == [6, 7]
    a.free([0, 1, 2])
    assert a.is_free(0) and a.num_used == 5


def test_split_refusals() -> None:
    a = BlockAllocator(4)
    a.allocate(1)
    refused(a, lambda: a.split(0), "cannot split")
    refused(a, lambda: a.split(-2), "cannot split")
    a.split(2)
    refused(a, lambda: a.split(2), "already split")
    refused(a, lambda: a.split(1), "already split")


def test_split_by_one_is_a_no_op() -> None:
    a = BlockAllocator(3)
    before = snapshot(a)
    a.split(1)
    assert snapshot(a) == before


def test_grow_in_split_mode_counts_sub_blocks() -> None:
    a = BlockAllocator(2, 4)
    a.split(2)
    a.grow(7)
    a.check_integrity()
    assert a.capacity == 7 and a.num_free == 7
    refused(a, lambda: a.grow(9), "can grow")


# ---------------------------------------------------------------- merge
def test_merge_restores_whole_blocks() -> None:
    a = BlockAllocator(4, 8)
    a.allocate(2)
    a.free([0])
    a.split(2)  # free: 4,5 6,7 0,1 ; used: 2,3
    a.merge()
    a.check_integrity()
    assert (a.capacity, a.ceiling, a.max_blocks, a.split_factor) == (4, 4, 8, 1)
    assert list(a._free) == [2, 3, 0] and a.used_ids() == frozenset({1})


def test_merge_refusals() -> None:
    a = BlockAllocator(4, 4)
    refused(a, a.merge, "not split")
    a.split(2)
    a.allocate(1)  # sub-block 0 used, 1 free
    refused(a, a.merge, "mixed")
    a.allocate(1)  # run 0..1 used alike
    a.merge()
    a.split(2)
    owners = {0: "a", 1: "b"}
    refused(a, lambda: a.merge(owners.__getitem__), "several owners")
    a.merge(lambda b: "a")
    assert a.split_factor == 1


def test_merge_refused_when_capacity_or_ceiling_is_not_whole() -> None:
    a = BlockAllocator(2, 4)
    a.split(2)
    a.grow(5)
    refused(a, a.merge, "whole number")
    a.shrink(3)  # capacity drops to 3: still not whole
    refused(a, a.merge, "whole number")
    a.shrink(2)
    a.merge()
    assert (a.capacity, a.max_blocks) == (1, 4)


# ---------------------------------------------------------------- allocate_aligned
def test_allocate_aligned_takes_whole_block_runs() -> None:
    a = BlockAllocator(4)
    a.split(2)  # free 0..7
    a.allocate(1)  # 0 used: run 0..1 broken
    a.free([])
    runs = a.allocate_aligned(2)
    assert runs == [[2, 3], [4, 5]]
    a.check_integrity()
    assert a.used_ids() == frozenset({0, 2, 3, 4, 5})


def test_allocate_aligned_refusals() -> None:
    a = BlockAllocator(3)
    a.split(2)
    a.allocate(1)  # 1, 2..5 free: two whole runs, three sub-blocks short of a third
    refused(a, lambda: a.allocate_aligned(3), "aligned runs")
    refused(a, lambda: a.allocate_aligned(-1), "aligned runs")
    assert a.allocate_aligned(0) == []


def test_allocate_aligned_skips_runs_above_the_ceiling() -> None:
    a = BlockAllocator(4)
    a.split(2)
    a.allocate(1)
    a.shrink(5)  # 5, 6, 7 retire; run 4..5 straddles the ceiling
    refused(a, lambda: a.allocate_aligned(2), "aligned runs")
    assert a.allocate_aligned(1) == [[2, 3]]


# ---------------------------------------------------------------- shrink
def test_shrink_returns_live_ids_and_finishes_when_they_are_freed() -> None:
    a = BlockAllocator(6, 8)
    a.allocate(6)
    a.free([0, 1, 4])
    assert a.shrink(3) == [3, 5]
    a.check_integrity()
    assert (a.ceiling, a.capacity) == (3, 6) and a.pending_shrink == [3, 5]
    assert a.allocate(2) == [0, 1]  # 4 is free but above the ceiling
    with pytest.raises(AllocatorError):
        a.allocate(1)
    a.free([5])
    assert a.pending_shrink == [3]
    a.free([3])
    a.check_integrity()
    assert a.pending_shrink == [] and a.capacity == 3
    refused(a, lambda: a.free([3]), "not in use")


def test_shrink_with_nothing_live_above_finishes_at_once() -> None:
    a = BlockAllocator(6)
    a.allocate(2)
    assert a.shrink(2) == []
    assert a.capacity == 2 and a.num_free == 0 and a.num_used == 2


def test_shrink_refusals() -> None:
    a = BlockAllocator(4, 8)
    refused(a, lambda: a.shrink(-1), "cannot shrink")
    refused(a, lambda: a.shrink(5), "cannot shrink")
    a.allocate(4)
    a.shrink(2)
    refused(a, lambda: a.shrink(3), "cannot shrink")  # above the lowered ceiling
    refused(a, lambda: a.grow(1), "can grow")


def test_grow_after_shrink_cancels_it_and_extends() -> None:
    a = BlockAllocator(6, 8)
    a.allocate(6)
    a.free([4])
    a.shrink(2)  # 4 retired; 2, 3, 5 pending
    a.grow(5)  # 4 comes back; 5 still pending
    a.check_integrity()
    assert a.pending_shrink == [5] and a.free_ids() == frozenset({4})
    a.grow(8)
    a.check_integrity()
    assert a.pending_shrink == [] and a.capacity == 8 and a.free_ids() == {4, 6, 7}


def test_shrink_in_split_mode_then_merge() -> None:
    a = BlockAllocator(4)
    a.split(2)
    runs = a.allocate_aligned(3)
    assert a.shrink(4) == [4, 5]  # the third run lives above: relocate it
    a.free(runs[2])
    assert a.capacity == 4
    a.merge()
    assert (a.capacity, a.max_blocks, a.used_ids()) == (2, 4, frozenset({0, 1}))


# ---------------------------------------------------------------- properties
class SplitMachine(RuleBasedStateMachine):
    """A model of used ids (with an owner tag each) checked against the allocator."""

    def __init__(self) -> None:
        super().__init__()
        self.a = BlockAllocator(6, 10)
        self.owner: dict[int, int] = {}  # used id -> owner tag

    @rule(n=st.integers(0, 4), tag=st.integers(0, 2))
    def alloc(self, n: int, tag: int) -> None:
        if n > self.a.num_free:
            refused(self.a, lambda: self.a.allocate(n), "cannot allocate")
            return
        ids = self.a.allocate(n)
        assert all(b < self.a.ceiling and b not in self.owner for b in ids)
        self.owner.update(dict.fromkeys(ids, tag))

    @rule(n=st.integers(0, 2), tag=st.integers(0, 2))
    def alloc_aligned(self, n: int, tag: int) -> None:
        try:
            runs = self.a.allocate_aligned(n)
        except AllocatorError:
            return
        g = self.a.split_factor
        assert len(runs) == n
        for run in runs:
            assert run[0] % g == 0 and run == list(range(run[0], run[0] + g))
            assert run[-1] < self.a.ceiling
            assert not set(run) & set(self.owner)
            self.owner.update(dict.fromkeys(run, tag))

    @precondition(lambda self: self.owner)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.owner)), unique=True))
        self.a.free(ids)
        for b in ids:
            del self.owner[b]

    @rule(g=st.integers(0, 3))
    def split(self, g: int) -> None:
        if g < 1 or self.a.split_factor != 1:
            refused(self.a, lambda: self.a.split(g), "cannot split|already split")
            return
        free, retired = self.a.free_ids(), self.a.retired_ids()
        self.a.split(g)
        self.owner = {b * g + j: t for b, t in self.owner.items() for j in range(g)}
        assert self.a.free_ids() == {b * g + j for b in free for j in range(g)}
        assert self.a.retired_ids() == {b * g + j for b in retired for j in range(g)}
        before = snapshot(self.a), dict(self.owner)
        if g > 1 and self._mergeable():  # round trip restores free set and ownership
            self.a.merge(self.owner.__getitem__)
            assert self.a.free_ids() == free and self.a.retired_ids() == retired
            self.a.split(g)
            assert (snapshot(self.a), self.owner) == before

    def _mergeable(self) -> bool:
        a, g = self.a, self.a.split_factor
        if a.capacity % g or a.ceiling % g:
            return False
        free, retired = a.free_ids(), a.retired_ids()
        for s in range(0, a.capacity, g):
            run = range(s, s + g)
            kinds = {"f" if b in free else "r" if b in retired else self.owner[b] for b in run}
            if len(kinds) != 1:
                return False
        return True

    @rule()
    def merge(self) -> None:
        g = self.a.split_factor
        if g == 1 or not self._mergeable():
            refused(self.a, lambda: self.a.merge(self.owner.__getitem__), "cannot merge")
            return
        self.a.merge(self.owner.__getitem__)
        self.owner = {b // g: t for b, t in self.owner.items() if b % g == 0}

    @rule(data=st.data())
    def shrink(self, data: st.DataObject) -> None:
        target = data.draw(st.integers(-1, self.a.ceiling + 1))
        if not 0 <= target <= self.a.ceiling:
            refused(self.a, lambda: self.a.shrink(target), "cannot shrink")
            return
        live = self.a.shrink(target)
        assert live == sorted(b for b in self.owner if b >= target)

    @rule(data=st.data())
    def grow(self, data: st.DataObject) -> None:
        cap = data.draw(st.integers(self.a.ceiling - 1, self.a.max_blocks + 1))
        if not self.a.ceiling <= cap <= self.a.max_blocks:
            refused(self.a, lambda: self.a.grow(cap), "can grow")
            return
        self.a.grow(cap)

    @invariant()
    def consistent(self) -> None:
        a = self.a
        a.check_integrity()
        assert a.used_ids() == set(self.owner)
        assert a.pending_shrink == sorted(b for b in self.owner if b >= a.ceiling)
        if not a.pending_shrink:
            assert a.capacity == a.ceiling and not a.retired_ids()
        assert a.num_used + a.num_free + len(a.retired_ids()) == a.capacity


SplitMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
test_split_machine = SplitMachine.TestCase
