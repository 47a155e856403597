"""The tensor arena: first-fit page runs, neighbours merge on free, the tiling invariant."""

from __future__ import annotations

import pytest

from services.mempool.tensor_store import PAGE_BYTES, PageArena, TensorStore, TensorStoreError


def test_first_fit_and_merge() -> None:
    arena = PageArena(10)
    assert [arena.allocate(n) for n in (3, 2, 4)] == [0, 3, 5]
    arena.free(3, 2)
    assert arena.allocate(1) == 3  # first fit: the hole, not the tail
    arena.free(0, 3)
    arena.free(3, 1)  # merges with [0, 3) and [4, 5)
    assert arena.ranges() == [(0, 5), (9, 1)]
    with pytest.raises(TensorStoreError, match="no run of 6"):
        arena.allocate(6)


def test_store_replace_delete_and_check() -> None:
    store = TensorStore(8)
    first = store.reserve(PAGE_BYTES + 1)  # two pages
    store.commit("w", "float32", (1,), PAGE_BYTES + 1, first)
    again = store.reserve(10)
    store.commit("w", "float32", (2,), 10, again)  # replacing frees the old pages
    store.check()
    assert store.arena.free_pages == 7
    pending = store.reserve(3 * PAGE_BYTES)
    store.check(reserved=[(pending, 3)])
    store.release(pending, 3 * PAGE_BYTES)
    store.delete("w")
    store.check()
    assert store.arena.free_pages == 8
    with pytest.raises(TensorStoreError, match="no tensor named 'w'"):
        store.get("w")
