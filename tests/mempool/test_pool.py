"""MemPool core with tiny pools and exact block ids: allocation, the prompt tree, pins,
LRU eviction and tiers. Time is a counter so LRU order is exact."""

from __future__ import annotations

import itertools

import pytest

from services.mempool.pool import InvalidBlocks, MemPool, OutOfMemory, UnknownHandle
from services.mempool.prompt_tree import Tier
from tests.mempool.helpers import BS, Memory


def make_pool(device: int = 8, host: int = 0, **kw: object) -> tuple[MemPool, Memory]:
    mem = Memory()
    tick = itertools.count()
    pool = MemPool(BS, device, host, copy_blocks=mem.copy, clock=lambda: float(next(tick)), **kw)  # type: ignore[arg-type]
    return pool, mem


def peek(pool: MemPool, tokens: list[int]) -> list[int]:
    """Matched block ids, without keeping the pin."""
    m = pool.match(tokens, promote=False)
    if m.handle:
        pool.release(m.handle)
    return m.block_ids


def cache(pool: MemPool, mem: Memory, tokens: list[int]) -> list[int]:
    """Allocate, 'compute' (write block contents), insert; return the index's block ids."""
    ids = pool.alloc_mem(-(-len(tokens) // BS), owner="w")
    for i, b in enumerate(ids):
        mem.data[(Tier.DEVICE, b)] = tuple(tokens[i * BS : (i + 1) * BS])
    return pool.insert(tokens, ids).index_block_ids


def test_alloc_free_exact_ids() -> None:
    pool, _ = make_pool(device=6)
    assert pool.alloc_mem(2) == [0, 1]
    assert pool.alloc_mem(3) == [2, 3, 4]
    pool.free_mem([1, 3])
    assert pool.alloc_mem(3) == [5, 1, 3]  # FIFO reuse of freed blocks
    with pytest.raises(OutOfMemory, match="2 blocks asked, 0 free"):
        pool.alloc_mem(2)
    pool.check_integrity()


def test_bad_frees_are_refused_and_change_nothing() -> None:
    pool, _ = make_pool(device=4)
    a = pool.alloc_mem(2)
    pool.free_mem(a)
    with pytest.raises(InvalidBlocks, match="0: free"):
        pool.free_mem([0])  # double free
    with pytest.raises(InvalidBlocks, match="unknown id"):
        pool.free_mem([99])
    with pytest.raises(InvalidBlocks, match="repeated"):
        pool.free_mem([1, 1])
    cache_ids = cache(pool, Memory(), list(range(8)))
    with pytest.raises(InvalidBlocks, match="owned by the index"):
        pool.free_mem(cache_ids)
    pool.check_integrity()
    assert pool.stats().free["device"] == 2


def test_insert_match_and_partial_tail() -> None:
    pool, _mem = make_pool(device=8)
    ids = pool.alloc_mem(3)
    r = pool.insert(list(range(10)), ids)  # 2 whole blocks + a tail of 2 tokens
    assert r.num_indexed_tokens == 8 and r.index_block_ids == [0, 1] and r.freed_block_ids == [2]
    m = pool.match(list(range(10)))
    assert (m.num_tokens, m.block_ids) == (8, [0, 1])
    assert pool.match([0, 1, 2]).num_tokens == 0  # a partial block never matches
    assert pool.match(list(range(10)), max_tokens=7).block_ids == [0]
    pool.check_integrity()


def test_insert_is_idempotent_and_frees_duplicates() -> None:
    pool, mem = make_pool(device=8)
    first = cache(pool, mem, list(range(8)))
    m = pool.match(list(range(8)))
    # Same tokens with the index's own blocks (matched earlier): nothing changes.
    r = pool.insert(list(range(8)), m.block_ids)
    assert r.index_block_ids == first and r.freed_block_ids == []
    # Same tokens computed again in other blocks: those are duplicates and get freed.
    dup = pool.alloc_mem(2)
    r = pool.insert(list(range(8)), dup)
    assert r.index_block_ids == first and r.freed_block_ids == dup
    # Extension: the shared prefix is reused, only the new block is added.
    ext = pool.alloc_mem(3)
    r = pool.insert(list(range(12)), [first[0], first[1], ext[0]])
    assert r.index_block_ids == [first[0], first[1], ext[0]]
    pool.free_mem(ext[1:])
    pool.release(m.handle)
    pool.check_integrity()
    assert pool.stats().index["device"] == 3


def test_insert_refuses_mismatched_counts_and_foreign_blocks() -> None:
    pool, mem = make_pool(device=8)
    ids = pool.alloc_mem(2)
    with pytest.raises(InvalidBlocks, match="need 3 blocks"):
        pool.insert(list(range(9)), ids)
    with pytest.raises(InvalidBlocks, match="not allocated to a client"):
        pool.insert(list(range(8)), [ids[0], 7])
    cached = cache(pool, mem, [9] * 8)
    with pytest.raises(InvalidBlocks, match="not allocated to a client"):
        pool.insert(list(range(8)), cached)  # index blocks of another prompt
    pool.check_integrity()
    assert pool.stats().client["device"] == 2


def test_lru_eviction_order_and_exact_count() -> None:
    pool, mem = make_pool(device=6)
    a = cache(pool, mem, [1] * 8)  # blocks 0, 1
    b = cache(pool, mem, [2] * 8)  # blocks 2, 3
    c = cache(pool, mem, [3] * 8)  # blocks 4, 5
    pool.release(pool.match([1] * 8).handle)  # a is now the most recently used
    assert pool.evict(3) == 3  # b fully, then the tail block of c
    assert peek(pool, [2] * 8) == []
    assert peek(pool, [3] * 8) == c[:1]
    assert peek(pool, [1] * 8) == a
    assert sorted(pool.alloc[Tier.DEVICE].free_ids()) == sorted([*b, c[1]])
    assert pool.evict(100) == 3  # exactly what is evictable
    pool.check_integrity()


def test_pins_protect_blocks_from_eviction() -> None:
    pool, mem = make_pool(device=4)
    cache(pool, mem, [1] * 8)
    cache(pool, mem, [2] * 8)
    m = pool.match([1] * 8)
    assert pool.evict(4) == 2  # only the unpinned prompt goes
    with pytest.raises(OutOfMemory):
        pool.alloc_mem(3)
    pool.release(m.handle)
    with pytest.raises(UnknownHandle):
        pool.release(m.handle)
    assert pool.alloc_mem(4) == [2, 3, 0, 1]
    pool.check_integrity()


def test_pinning_a_deep_node_pins_its_prefix() -> None:
    pool, mem = make_pool(device=5)
    cache(pool, mem, [1] * 8 + [2] * 4)
    cache(pool, mem, [1] * 8 + [3] * 4)
    m = pool.match([1] * 8 + [2] * 4)
    assert pool.evict(5) == 1  # only the [3] leaf; the shared prefix is pinned through [2]
    pool.release(m.handle)
    pool.check_integrity()


def test_delete_and_reinsert() -> None:
    pool, mem = make_pool(device=8)
    cache(pool, mem, [1] * 8 + [2] * 4)
    cache(pool, mem, [1] * 8 + [3] * 4)
    assert pool.delete([1] * 8 + [2] * 4) == 1  # the shared prefix stays for [3]
    m = pool.match([1] * 8 + [3] * 4)
    assert m.num_tokens == 12
    assert pool.delete([1] * 8) == 0  # internal node: still needed
    assert pool.delete([1] * 8 + [3] * 4) == 0  # pinned by the match
    pool.release(m.handle)
    assert pool.delete([1] * 8 + [3] * 4) == 3
    assert pool.stats().index["device"] == 0
    again = cache(pool, mem, [1] * 8 + [2] * 4)
    assert peek(pool, [1] * 8 + [2] * 4) == again
    pool.check_integrity()


def test_demote_to_host_and_promote_back() -> None:
    pool, mem = make_pool(device=4, host=4)
    a = cache(pool, mem, [1] * 8)
    cache(pool, mem, [2] * 8)
    client = pool.alloc_mem(2)  # no free device blocks: the LRU prompt [1] moves to the host
    assert client == a
    assert pool.stats().index == {"device": 2, "host": 2}
    m = pool.match([1] * 8, promote=False)
    assert m.tiers == [Tier.HOST, Tier.HOST]
    assert [mem.data[(Tier.HOST, b)] for b in m.block_ids] == [(1,) * 4, (1,) * 4]
    pool.release(m.handle)
    pool.free_mem(client)
    m = pool.match([1] * 8)  # promote: back on the device, same bytes
    assert m.tiers == [Tier.DEVICE, Tier.DEVICE]
    assert [mem.data[(Tier.DEVICE, b)] for b in m.block_ids] == [(1,) * 4, (1,) * 4]
    pool.release(m.handle)
    pool.check_integrity()


def test_promotion_stops_where_device_memory_ends() -> None:
    pool, mem = make_pool(device=2, host=4)
    cache(pool, mem, [1] * 8)
    held = pool.alloc_mem(1)  # demotes the tail block of [1]
    m = pool.match([1] * 8)
    assert m.num_tokens == 4 and m.tiers == [Tier.DEVICE]  # no device room for the host block
    pool.release(m.handle)
    pool.free_mem(held)
    pool.check_integrity()


def test_swap_out_and_in_keep_bytes() -> None:
    pool, mem = make_pool(device=4, host=4)
    ids = pool.alloc_mem(2, owner="r1")
    mem.data[(Tier.DEVICE, ids[0])] = "x"
    mem.data[(Tier.DEVICE, ids[1])] = "y"
    host = pool.swap_out(ids)
    assert [mem.data[(Tier.HOST, b)] for b in host] == ["x", "y"]
    assert pool.stats().client == {"device": 0, "host": 2}
    back = pool.swap_in(host)
    assert [mem.data[(Tier.DEVICE, b)] for b in back] == ["x", "y"]
    with pytest.raises(InvalidBlocks):
        pool.swap_in(host)  # already swapped in
    pool.free_mem(back)
    pool.check_integrity()


def test_release_owner_frees_a_dead_clients_blocks_and_pins() -> None:
    pool, mem = make_pool(device=8)
    cache(pool, mem, [1] * 8)
    pool.alloc_mem(3, owner="dead")
    pool.match([1] * 8, owner="dead")
    pool.alloc_mem(1, owner="alive")
    assert pool.release_owner("dead") == 3
    st = pool.stats()
    assert st.client["device"] == 1 and st.pinned["device"] == 0
    pool.check_integrity()


def test_grow_adds_blocks() -> None:
    pool, _ = make_pool(device=2, device_max_blocks=6)
    pool.alloc_mem(2)
    pool.grow(5)
    assert pool.alloc_mem(3) == [2, 3, 4]
    with pytest.raises(Exception, match="at most 6"):
        pool.grow(7)
    pool.check_integrity()


def test_ttl_drops_stale_leaves() -> None:
    pool, mem = make_pool(device=8, ttl_s=5.0)
    cache(pool, mem, [1] * 8)
    for _ in range(10):
        pool.clock()
    cache(pool, mem, [2] * 8)
    assert pool.expire() == 2
    assert peek(pool, [1] * 8) == [] and len(peek(pool, [2] * 8)) == 2
    pool.check_integrity()


def test_events_describe_every_change() -> None:
    pool, mem = make_pool(device=4, host=2)
    cache(pool, mem, [1] * 8)
    ev = pool.drain_events()
    assert [(e.stored, e.tier) for e in ev] == [(True, Tier.DEVICE)]
    assert len(ev[0].hashes) == 2 and len(ev[0].token_bytes) == 8 * 4
    pool.evict(1)  # the tail block goes to the host
    ev = pool.drain_events()
    assert [(e.stored, e.tier, len(e.hashes)) for e in ev] == [
        (False, Tier.DEVICE, 1),
        (True, Tier.HOST, 1),
    ]
    pool.evict(2, Tier.HOST)
    assert [(e.stored, e.tier) for e in pool.drain_events()] == [(False, Tier.HOST)]


def test_blocks_in_transfer_cannot_be_freed_swapped_or_inserted() -> None:
    pool, _mem = make_pool(device=6, host=2)
    ids = pool.alloc_mem(2, owner="w")
    pool.mark_busy(ids)
    for call in (
        lambda: pool.free_mem(ids),
        lambda: pool.swap_out(ids),
        lambda: pool.insert(list(range(8)), ids),
    ):
        with pytest.raises(InvalidBlocks, match="being transferred"):
            call()
    # The client dies mid-transfer: its other blocks go now, the busy ones when it ends.
    other = pool.alloc_mem(1, owner="w")
    assert pool.release_owner("w") == 1 and other[0] in pool.alloc[Tier.DEVICE].free_ids()
    pool.check_integrity()
    pool.unmark_busy(ids)
    assert pool.stats().client["device"] == 0 and pool.stats().free["device"] == 6
    pool.check_integrity()


def test_pinned_transfer_sources_survive_eviction_and_delete() -> None:
    pool, mem = make_pool(device=4)
    cached = cache(pool, mem, [1] * 8)
    pin = pool.pin_blocks(cached)
    assert pin and pool.delete([1] * 8) == 0 and pool.evict(4) == 0
    with pytest.raises(OutOfMemory):
        pool.alloc_mem(3)
    pool.check_integrity()
    pool.release(pin)
    assert pool.evict(4) == 2
    pool.check_integrity()


def test_insert_reports_where_each_indexed_block_lives() -> None:
    pool, mem = make_pool(device=4, host=4)
    cache(pool, mem, [1] * 8)
    held = pool.alloc_mem(4)  # demotes [1] * 8 to the host
    m = pool.match([1] * 8, promote=False)  # pinned on the host
    pool.free_mem(held)
    r = pool.insert([1] * 8, pool.alloc_mem(2))
    assert r.index_tiers == [Tier.HOST, Tier.HOST] and r.index_block_ids == m.block_ids
    pool.release(m.handle)
    pool.check_integrity()


def test_swap_out_n_only_demotes() -> None:
    pool, mem = make_pool(device=4, host=1)
    cache(pool, mem, [1] * 8)
    assert pool.evict(1, demote_only=True) == 1
    assert pool.stats().index == {"device": 1, "host": 1}
    # The host makes room by dropping its own LRU leaf; the device block still only moves.
    assert pool.evict(1, demote_only=True) == 1
    assert pool.stats().index == {"device": 0, "host": 1}
    no_host, mem2 = make_pool(device=4)
    cache(no_host, mem2, [1] * 8)
    assert no_host.evict(2, demote_only=True) == 0  # nowhere to demote: nothing is dropped
    assert no_host.stats().index["device"] == 2
    pool.check_integrity()
    no_host.check_integrity()


def test_insert_with_pin_owner_pins_what_it_indexed() -> None:
    pool, mem = make_pool(device=8)
    cached = cache(pool, mem, [1] * 8)  # a shared prefix already in the index
    ids = pool.alloc_mem(4, owner="w")
    r = pool.insert([1] * 8 + [2] * 4 + [9], ids, pin_owner="decoder")
    # The whole path is pinned: the cached prefix's blocks, then the caller's new block;
    # duplicates of cached blocks and the partial tail are freed as in a plain insert.
    assert r.handle and r.index_block_ids == [*cached, ids[2]] and r.num_indexed_tokens == 12
    assert sorted(r.freed_block_ids) == sorted([*ids[:2], ids[3]])
    assert pool.evict(8) == 0  # nothing evictable while the pin holds
    assert pool.delete([1] * 8 + [2] * 4) == 0
    assert pool.stats().pinned["device"] == 3
    pool.check_integrity()
    pool.release(r.handle)
    assert pool.stats().pinned["device"] == 0 and pool.evict(8) == 3
    # A dead client's pins go with it, like a match's.
    r = pool.insert([3] * 4, pool.alloc_mem(1, owner="w"), pin_owner="dead")
    assert r.handle and pool.release_owner("dead") == 0 and pool.stats().pinned["device"] == 0
    # Under one block: nothing is indexed and nothing is pinned.
    short = pool.insert([4] * 3, pool.alloc_mem(1, owner="w"), pin_owner="decoder")
    assert short.handle == 0 and short.index_block_ids == [] and len(short.freed_block_ids) == 1
    pool.check_integrity()


def test_pinned_insert_brings_a_host_prefix_back_to_the_device() -> None:
    pool, mem = make_pool(device=4, host=4)
    cache(pool, mem, [1] * 8)
    cache(pool, mem, [2] * 8)
    held = pool.alloc_mem(2)  # demotes [1] to the host
    pool.free_mem(held)
    assert peek(pool, [1] * 8) and pool.stats().index == {"device": 2, "host": 2}
    ids = pool.alloc_mem(3, owner="w")
    r = pool.insert([1] * 8 + [5] * 4, ids, pin_owner="decoder")
    # As a promoting match would: every pinned block is on the device, same bytes.
    assert r.handle and r.index_tiers == [Tier.DEVICE] * 3
    assert [mem.data[(Tier.DEVICE, b)] for b in r.index_block_ids[:2]] == [(1,) * 4, (1,) * 4]
    pool.release(r.handle)
    pool.check_integrity()
