"""The prompt tree's derived structures, exact after every kind of change: the evictable sets
and their LRU heap, the lazily computed block hashes and the events that carry them, and
the match result built a node at a time. Time is a counter so LRU order is exact."""

from __future__ import annotations

import itertools

import numpy as np

from common.tokens import ROOT_HASH, as_token_bytes, block_hashes, chain_hash
from services.mempool.client_blocks import ClientBlocks
from services.mempool.pool import MemPool, _blocks_and_tiers
from services.mempool.prompt_tree import Node, PromptTree, Tier

BS = 4


def make_tree() -> PromptTree:
    tick = itertools.count()
    return PromptTree(BS, lambda: float(next(tick)))


def tokens(*runs: tuple[int, int]) -> bytes:
    """Whole blocks: (value, number of blocks) runs."""
    return as_token_bytes([v for v, n in runs for _ in range(n * BS)])


def evictable(tree: PromptTree, tier: Tier = Tier.DEVICE) -> set[int]:
    """The evictable nodes as the first token of each (the test prompts make that unique)."""
    return {int(np.frombuffer(n.key[:4], "<i4")[0]) for n in tree.evictable[tier]}


def test_evictable_set_follows_insert_split_lock_and_remove() -> None:
    tree = make_tree()
    a = tree.insert(tokens((1, 2), (2, 2)), [0, 1, 2, 3], Tier.DEVICE).nodes[-1]
    assert evictable(tree) == {1}  # one leaf holding all four blocks
    tree.insert(tokens((1, 2), (3, 1)), [4, 5, 6], Tier.DEVICE)  # splits a after 2 blocks
    assert evictable(tree) == {2, 3}  # the two leaves; the shared prefix has device children
    tree.check()
    tree.lock(a)
    assert evictable(tree) == {3}  # a and its prefix are pinned
    tree.unlock(a)
    assert evictable(tree) == {2, 3}
    tree.remove_leaf(a)
    assert evictable(tree) == {3}
    leaf3 = tree.match(tokens((1, 2), (3, 1)))[0][-1]
    tree.remove_leaf(leaf3)
    assert evictable(tree) == {1}  # the prefix is a leaf now
    tree.check()


def test_a_device_node_with_only_host_children_is_evictable_on_the_device() -> None:
    tree = make_tree()
    path = tree.insert(tokens((1, 1), (2, 1)), [0, 1], Tier.DEVICE).nodes
    tree.insert(tokens((1, 1), (3, 1)), [2, 3], Tier.DEVICE)
    parent, leaf = tree.match(tokens((1, 1)))[0][0], path[-1]
    assert parent is not leaf and evictable(tree) == {2, 3}
    tree.move_tier(leaf, [7], Tier.HOST)
    assert evictable(tree, Tier.HOST) == {2} and evictable(tree) == {3}
    other = tree.match(tokens((1, 1), (3, 1)))[0][-1]
    tree.move_tier(other, [8], Tier.HOST)
    # Both children left the device: the parent may go (demoted), the host leaves may drop.
    assert evictable(tree) == {1} and evictable(tree, Tier.HOST) == {2, 3}
    tree.check()


def test_lru_pops_least_recently_used_and_skips_stale_entries() -> None:
    tree = make_tree()
    for v in (1, 2, 3):
        tree.insert(tokens((v, 2)), [2 * v, 2 * v + 1], Tier.DEVICE)
    tree.match(tokens((1, 2)))  # 1 becomes the most recent: its old entry goes stale
    order = []
    while (n := tree.pop_lru(Tier.DEVICE)) is not None:
        order.append(int(np.frombuffer(n.key[:4], "<i4")[0]))
        tree.remove_leaf(n)
    assert order == [2, 3, 1]
    tree.check()


def test_pool_eviction_order_matches_a_full_scan() -> None:
    tick = itertools.count()
    pool = MemPool(BS, 64, clock=lambda: float(next(tick)))
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 3, size=BS * 3, dtype=np.int32) for _ in range(12)]
    for p in prompts:
        pool.insert(p, pool.alloc_mem(3))
    for i in (5, 0, 7):
        pool.release(pool.match(prompts[i]).handle)
    expected = sorted(
        (n.last_access, n.node_id)
        for n in pool.tree.nodes()
        if not n.lock_ref and n.tier == Tier.DEVICE and not n.children
    )[0]
    first = pool.tree.pop_lru(Tier.DEVICE)
    assert first is not None and (first.last_access, first.node_id) == expected
    pool.tree.requeue([first])
    pool.evict(10)
    pool.check_integrity()


def test_match_ids_are_the_per_block_concatenation() -> None:
    tree = make_tree()
    tree.insert(tokens((1, 2), (2, 3)), [0, 1, 2, 3, 4], Tier.DEVICE)
    tree.insert(tokens((1, 2), (2, 1), (4, 2)), [5, 6, 7, 8, 9], Tier.DEVICE)
    path, _ = tree.match(tokens((1, 2), (2, 1), (4, 2)))
    assert [n.num_blocks for n in path] == [3, 2]  # the first leaf was split after 3 blocks
    tree.move_tier(path[1], [30, 31], Tier.HOST)
    blocks, tiers = _blocks_and_tiers(path)
    assert blocks == [b for n in path for b in n.blocks] == [0, 1, 2, 30, 31]
    assert tiers == [n.tier for n in path for _ in n.blocks]
    assert tiers == [Tier.DEVICE] * 3 + [Tier.HOST] * 2


def _chained(parent: int, data: bytes) -> list[int]:
    out = []
    for i in range(0, len(data), BS * 4):
        parent = chain_hash(parent, data[i : i + BS * 4])
        out.append(parent)
    return out


def test_events_carry_exact_hashes_though_computed_late() -> None:
    tree = make_tree()
    data = tokens((1, 2), (2, 2))
    leaf = tree.insert(data, [0, 1, 2, 3], Tier.DEVICE).nodes[-1]
    assert leaf.hashes is None  # nothing hashed on insert
    tree.insert(tokens((1, 2), (3, 1)), [4, 5, 6], Tier.DEVICE)  # splits it before the drain
    tree.remove_leaf(leaf)  # and drops its tail before the drain
    events = tree.drain_events()
    full = _chained(ROOT_HASH, data)
    assert [(e.stored, e.hashes) for e in events] == [
        (True, full),
        (True, _chained(full[1], tokens((3, 1)))),
        (False, full[2:]),
    ]
    assert events[1].parent_hash == full[1] and events[0].token_bytes == data
    tree.check()


def test_block_hashes_chain_and_are_fixed_across_processes() -> None:
    rng = np.random.default_rng(0)
    for block_size in (1, 3, 4, 16):
        data = rng.integers(0, 1 << 31, size=block_size * 9, dtype=np.int32).tobytes()
        parent = 12345
        expected = []
        for i in range(9):
            parent = chain_hash(parent, data[i * block_size * 4 : (i + 1) * block_size * 4])
            expected.append(parent)
        assert block_hashes(12345, data, block_size * 4) == expected
        assert len(set(expected)) == 9 and 0 not in expected
    # A fixed value: the scheduler in another process must compute the same.
    assert chain_hash(ROOT_HASH, as_token_bytes([1, 2, 3, 4])) == 17812186085639342170


def test_client_blocks_give_take_and_reclaim_owner_codes() -> None:
    cb = ClientBlocks(8)
    cb.give([1, 2], "a")
    cb.give([3], "")
    assert len(cb) == 3 and cb[2] == "a" and cb[3] == "" and 0 not in cb
    cb.give([2], "b")  # re-owned
    assert cb.items() == [(1, "a"), (2, "b"), (3, "")]
    idx = cb.index([1, 2])
    assert idx is not None and cb.owns_all(idx) and not cb.has_repeats(idx)
    assert cb.index([1, 8]) is None and cb.index([-1]) is None
    rep = cb.index([1, 1])
    assert rep is not None and cb.has_repeats(rep)
    cb.take([1, 2, 3])
    assert len(cb) == 0 and cb.get(1) is None
    for i in range(3000):  # owner names that never repeat do not grow the table forever
        cb.give([i % 8], f"transfer:{i}")
        cb.take([i % 8])
    assert len(cb._names) < 2100
    cb.check()


def test_split_keeps_computed_hashes() -> None:
    tree = make_tree()
    data = tokens((1, 2), (2, 2))
    node: Node = tree.insert(data, [0, 1, 2, 3], Tier.DEVICE).nodes[-1]
    tree.drain_events()
    assert node.hashes == _chained(ROOT_HASH, data)
    prefix = tree.split(node, 1)
    assert prefix.hashes is not None and prefix.hashes + node.hashes == _chained(ROOT_HASH, data)
    tree.check()
