"""The global prompt tree, fed with KV events built from real chained hashes: exact
per-instance matches, removal, AllCleared, resync on a seq gap, TTL, a block held on
both tiers of one instance, and index snapshots (load, replay of what came after, a gap
asking for another, a daemon without them)."""

from __future__ import annotations

import time

from common.protocol import kv_events as ev
from common.protocol.mempool import IndexRun, IndexSnapshotReply
from services.scheduler.global_tree import GlobalPromptTree, PromptHashes
from tests.scheduler.helpers import BLOCK_SIZE, batch, prompt, removed, stored


def test_matches_are_exact_per_instance() -> None:
    tree = GlobalPromptTree("colocated", ttl_s=600)
    doc = prompt(64)  # 4 blocks
    tree.apply(batch("w0", 0, stored(doc)), now=0)
    tree.apply(batch("w1", 0, stored(doc[:32])), now=0)
    # w1 later extends its 2 blocks with a different continuation.
    other = doc[:32] + prompt(32, seed=5)
    tree.apply(batch("w1", 1, stored(other, parent_tokens=doc[:32])), now=0)

    req = PromptHashes([*doc, 1, 2, 3])
    assert tree.match(req, "w0") == 64
    assert tree.match(req, "w1") == 32
    assert tree.match(PromptHashes(other), "w1") == 64
    assert tree.match(PromptHashes(other), "w0") == 32
    assert tree.match(req, "nobody") == 0
    assert tree.match_all(req) == {"w0": 64, "w1": 32}
    # A partial block never matches, a different first block matches nothing.
    assert tree.match(PromptHashes(doc[:20]), "w0") == 16
    assert tree.match(PromptHashes(prompt(64, seed=9)), "w0") == 0
    # The cap stops hashing where a worker stops matching (all but the last token).
    assert tree.match(PromptHashes(doc, max_tokens=len(doc) - 1), "w0") == 48


def test_removed_blocks_cut_the_match_and_all_cleared_forgets() -> None:
    tree = GlobalPromptTree("prefill", ttl_s=600)
    doc = prompt(64)
    tree.apply(batch("p0", 0, stored(doc)), now=0)
    tree.apply(batch("p0", 1, removed(doc, first_block=2)), now=0)
    assert tree.match(PromptHashes(doc), "p0") == 32
    assert tree.num_blocks("p0") == 2
    tree.apply(batch("p0", 2, ev.AllCleared()), now=0)
    assert tree.match(PromptHashes(doc), "p0") == 0 and tree.num_blocks("p0") == 0
    # A hole in the chain ends the match even if later blocks are held.
    tree.apply(batch("p0", 3, stored(doc)), now=0)
    tree.apply(batch("p0", 4, removed(doc[:32], first_block=1)), now=0)
    assert tree.match(PromptHashes(doc), "p0") == 16


def test_seq_gap_or_late_first_batch_drops_the_instance_first() -> None:
    tree = GlobalPromptTree("colocated", ttl_s=600)
    a, b = prompt(32, seed=1), prompt(32, seed=2)
    tree.apply(batch("w0", 0, stored(a)), now=0)
    assert not tree.apply(batch("w0", 1, stored(b)), now=0)
    assert tree.resyncs == 0
    # seq 2 lost: what w0 holds is unknown, so its entries go before applying seq 3.
    assert tree.apply(batch("w0", 3, stored(b)), now=0)
    assert tree.resyncs == 1
    assert tree.match(PromptHashes(a), "w0") == 0 and tree.match(PromptHashes(b), "w0") == 32
    # A subscriber that joins late: first batch with seq != 0 resyncs too.
    assert tree.apply(batch("w1", 7, stored(a)), now=0)
    assert tree.resyncs == 2 and tree.match(PromptHashes(a), "w1") == 32
    tree.remove_instance("w1")
    assert tree.match(PromptHashes(a), "w1") == 0 and tree.instances() == ["w0"]


def test_ttl_drops_blocks_not_stored_again() -> None:
    tree = GlobalPromptTree("colocated", ttl_s=10)
    old, fresh = prompt(32, seed=1), prompt(32, seed=2)
    tree.apply(batch("w0", 0, stored(old)), now=0)
    tree.apply(batch("w0", 1, stored(fresh)), now=6)
    assert tree.expire(now=10) == 0
    assert tree.expire(now=11) == 2
    assert tree.match(PromptHashes(old), "w0") == 0
    assert tree.match(PromptHashes(fresh), "w0") == 32
    tree.apply(batch("w0", 2, stored(fresh)), now=15)  # stored again: the clock restarts
    assert tree.expire(now=20) == 0 and tree.match(PromptHashes(fresh), "w0") == 32
    assert tree.expire(now=26) == 2 and tree.num_blocks("w0") == 0


def test_block_on_device_and_host_stays_until_both_tiers_drop_it() -> None:
    tree = GlobalPromptTree("decode", ttl_s=600)
    doc = prompt(48)
    h0 = PromptHashes(doc).get(BLOCK_SIZE)[0]
    tree.apply(batch("d0", 0, stored(doc, tier=0)), now=0)
    tree.apply(batch("d0", 1, stored(doc, tier=1)), now=0)  # demoted copy on the host
    assert tree.tiers("d0", h0) == {0, 1}
    tree.apply(batch("d0", 2, removed(doc, tier=0)), now=0)
    assert tree.tiers("d0", h0) == {1} and tree.match(PromptHashes(doc), "d0") == 48
    tree.apply(batch("d0", 3, removed(doc, tier=1)), now=0)
    assert tree.tiers("d0", h0) == set() and tree.match(PromptHashes(doc), "d0") == 0


def test_match_is_cheap_enough_to_run_per_request() -> None:
    """10k cached blocks over 8 instances, a 4K-token prompt: the match is exact (the
    timing is printed for the record, not asserted)."""
    tree = GlobalPromptTree("colocated", ttl_s=600)
    for i in range(8):
        for d in range(5):
            doc = prompt(250 * BLOCK_SIZE, seed=100 * i + d)
            tree.apply(batch(f"w{i}", d, stored(doc)), now=0)
    req_tokens = prompt(250 * BLOCK_SIZE, seed=300) + prompt(96, seed=1)  # w3 holds 250 blocks
    start = time.perf_counter()
    req = PromptHashes(req_tokens, max_tokens=len(req_tokens) - 1)
    got = {f"w{i}": tree.match(req, f"w{i}") for i in range(8)}
    elapsed_ms = (time.perf_counter() - start) * 1e3
    print(
        f"match of 4K tokens against {sum(tree.num_blocks(i) for i in tree.instances())} blocks: {elapsed_ms:.3f} ms"
    )
    assert got == {f"w{i}": (250 * BLOCK_SIZE if i == 3 else 0) for i in range(8)}


def snapshot(seq: int, *docs: list[int], tier: int = 0) -> IndexSnapshotReply:
    runs = [IndexRun(tier, PromptHashes(d).get(BLOCK_SIZE)) for d in docs]
    return IndexSnapshotReply("m0", seq, BLOCK_SIZE, runs)


def test_a_snapshot_then_the_batches_after_it_rebuild_an_instance() -> None:
    """Subscribe, snapshot, replay: batches buffered while the snapshot was fetched apply
    only if numbered after it; the snapshot's own batch confirms the subscription."""
    tree = GlobalPromptTree("colocated", ttl_s=600)
    old, a, b = prompt(32, seed=1), prompt(32, seed=2), prompt(32, seed=3)
    tree.apply(batch("w0", 0, stored(old)), now=0)
    tree.begin_sync("w0", BLOCK_SIZE)
    assert tree.syncing("w0")
    assert not tree.apply(batch("w0", 4, stored(a)), now=0)  # buffered: in the snapshot
    assert not tree.apply(batch("w0", 5), now=0)  # buffered: the snapshot's own batch
    assert not tree.apply(batch("w0", 6, stored(b)), now=0)  # buffered: after it
    assert tree.match(PromptHashes(old), "w0") == 32  # old entries stay until the load
    assert not tree.load("w0", snapshot(5, a), now=1)
    assert not tree.syncing("w0") and tree.unconfirmed(now=5, after_s=1) == []
    assert tree.match(PromptHashes(old), "w0") == 0  # the snapshot replaced them
    assert tree.match(PromptHashes(a), "w0") == 32 and tree.match(PromptHashes(b), "w0") == 32
    assert not tree.apply(batch("w0", 7, removed(b)), now=1)
    assert tree.match(PromptHashes(b), "w0") == 0 and tree.resyncs == 0


def test_a_gap_asks_for_a_snapshot_when_the_daemon_answers_them() -> None:
    tree = GlobalPromptTree("colocated", ttl_s=600)
    a, b = prompt(32, seed=1), prompt(32, seed=2)
    tree.begin_sync("w0", BLOCK_SIZE)
    tree.load("w0", snapshot(3, a), now=0)
    # Nothing came after the snapshot yet: unconfirmed (the SUB may have joined late).
    assert tree.unconfirmed(now=0.5, after_s=1) == [] and tree.unconfirmed(1, 1) == ["w0"]
    assert tree.apply(batch("w0", 6, stored(b)), now=1)  # 4, 5 lost: fetch a snapshot
    assert tree.syncing("w0") and tree.resyncs == 1 and tree.num_blocks("w0") == 0
    assert tree.unconfirmed(now=9, after_s=1) == []  # syncing again
    # The new snapshot (seq 6) covers the buffered batch; replay skips it.
    assert not tree.load("w0", snapshot(6, a, b), now=2)
    assert tree.match(PromptHashes(b), "w0") == 32 and tree.num_blocks("w0") == 4
    # A replay that finds a gap asks again.
    tree.begin_sync("w0", BLOCK_SIZE)
    tree.apply(batch("w0", 9, stored(b)), now=3)
    assert tree.load("w0", snapshot(7, a), now=3) and tree.syncing("w0")


def test_a_daemon_restart_needs_no_snapshot_and_a_dropped_instance_ignores_one() -> None:
    tree = GlobalPromptTree("colocated", ttl_s=600)
    a, b = prompt(32, seed=1), prompt(32, seed=2)
    tree.begin_sync("w0", BLOCK_SIZE)
    tree.load("w0", snapshot(8, a), now=0)
    # A daemon's first batch (seq 0, AllCleared) starts over exactly.
    assert not tree.apply(batch("w0", 0, ev.AllCleared()), now=1)
    assert not tree.apply(batch("w0", 1, stored(b)), now=1)
    assert tree.match(PromptHashes(a), "w0") == 0 and tree.match(PromptHashes(b), "w0") == 32
    tree.begin_sync("w0", BLOCK_SIZE)
    tree.remove_instance("w0")  # dropped while its snapshot was in flight
    assert not tree.load("w0", snapshot(2, a), now=2) and tree.instances() == []


def test_without_snapshots_the_buffer_replays_as_events_alone() -> None:
    tree = GlobalPromptTree("colocated", ttl_s=600)
    a, b = prompt(32, seed=1), prompt(32, seed=2)
    tree.begin_sync("w0", BLOCK_SIZE)
    tree.apply(batch("w0", 4, stored(a)), now=0)
    tree.apply(batch("w0", 5, stored(b)), now=0)
    tree.fallback("w0", now=0)  # the daemon does not answer IndexSnapshot
    assert not tree.syncing("w0") and tree.resyncs == 1
    assert tree.match(PromptHashes(a), "w0") == 32 and tree.match(PromptHashes(b), "w0") == 32
    assert tree.apply(batch("w0", 9, stored(a)), now=0)  # a gap: resync by dropping
    assert not tree.syncing("w0")  # (no snapshot to wait for)
    assert tree.resyncs == 2 and tree.match(PromptHashes(b), "w0") == 0
