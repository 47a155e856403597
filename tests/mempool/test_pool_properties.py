"""Random insert / match / release / delete / alloc / free / evict / swap sequences against
a reference model, with `check_integrity` after every step (which proves the tree's
evictable sets exact) and the LRU heap's front checked against a scan of the whole tree.

The model is rebuilt from the pool's own KV events (stored / removed chained hashes per
tier), so it checks three things at once: the events describe the index exactly, every
match returns the longest prefix the events say is cached, and every matched block holds
the bytes of its tokens (a fake memory follows every copy between tiers)."""

from __future__ import annotations

import contextlib
import itertools

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.tokens import ROOT_HASH, as_token_bytes, chain_hash
from services.mempool.pool import MemPool, OutOfMemory
from services.mempool.prompt_tree import Tier
from tests.mempool.helpers import BS, Memory

# A few recurring prompts with shared prefixes (so the same prompt is matched, pinned and
# deleted again), plus arbitrary ones.
_BASES = [[0] * 8, [0] * 4 + [1] * 4, [1] * 8, [0] * 8 + [2] * 4, [2] * 12, [0] * 8 + [2] * 5]
prompts = st.one_of(st.sampled_from(_BASES), st.lists(st.integers(0, 2), min_size=1, max_size=14))


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mem = Memory()
        tick = itertools.count()
        self.pool = MemPool(BS, 12, 6, copy_blocks=self.mem.copy, clock=lambda: float(next(tick)))
        self.cached: dict[Tier, set[int]] = {Tier.DEVICE: set(), Tier.HOST: set()}
        self.handles: list[tuple[int, list[int]]] = []  # (handle, pinned block hashes)
        self.client: list[list[int]] = []  # blocks held by 'running requests'

    def _apply_events(self) -> None:
        for ev in self.pool.drain_events():
            for h in ev.hashes:
                if ev.stored:
                    assert h not in self.cached[ev.tier], "stored twice"
                    self.cached[ev.tier].add(h)
                else:
                    self.cached[ev.tier].remove(h)

    def _expected_match(self, tokens: list[int], promote: bool) -> int:
        data = as_token_bytes(tokens)
        parent, n = ROOT_HASH, 0
        for i in range(len(tokens) // BS):
            parent = chain_hash(parent, data[i * BS * 4 : (i + 1) * BS * 4])
            if parent not in self.cached[Tier.DEVICE] and parent not in self.cached[Tier.HOST]:
                break
            n += BS
        return n

    @rule(tokens=prompts)
    def insert(self, tokens: list[int]) -> None:
        try:
            ids = self.pool.alloc_mem(-(-len(tokens) // BS), owner="req")
        except OutOfMemory:
            return
        for i, b in enumerate(ids):
            self.mem.data[(Tier.DEVICE, b)] = tuple(tokens[i * BS : (i + 1) * BS])
        r = self.pool.insert(tokens, ids)
        assert r.num_indexed_tokens == len(tokens) // BS * BS

    @rule(tokens=prompts, promote=st.booleans())
    def match(self, tokens: list[int], promote: bool) -> None:
        self._apply_events()
        longest = self._expected_match(tokens, promote)
        m = self.pool.match(tokens, promote=promote)
        self._apply_events()
        assert m.num_tokens <= longest
        if not promote:
            assert m.num_tokens == longest
        for i, (b, tier) in enumerate(zip(m.block_ids, m.tiers, strict=True)):
            assert self.mem.data[(tier, b)] == tuple(tokens[i * BS : (i + 1) * BS]), (
                "matched block holds other bytes"
            )
        if m.handle:
            data = as_token_bytes(tokens)
            parent, hashes = ROOT_HASH, []
            for i in range(m.num_tokens // BS):
                parent = chain_hash(parent, data[i * BS * 4 : (i + 1) * BS * 4])
                hashes.append(parent)
            self.handles.append((m.handle, hashes))

    @precondition(lambda self: self.handles)
    @rule(i=st.integers(0, 100))
    def release(self, i: int) -> None:
        handle, _ = self.handles.pop(i % len(self.handles))
        self.pool.release(handle)

    @rule(tokens=prompts)
    def delete(self, tokens: list[int]) -> None:
        self.pool.delete(tokens)

    @rule(n=st.integers(1, 6))
    def alloc(self, n: int) -> None:
        with contextlib.suppress(OutOfMemory):
            self.client.append(self.pool.alloc_mem(n, owner="req"))

    @precondition(lambda self: self.client)
    @rule(i=st.integers(0, 100))
    def free(self, i: int) -> None:
        self.pool.free_mem(self.client.pop(i % len(self.client)))

    @precondition(lambda self: self.client)
    @rule(i=st.integers(0, 100))
    def swap_round_trip(self, i: int) -> None:
        j = i % len(self.client)
        try:
            host = self.pool.swap_out(self.client[j])
        except OutOfMemory:
            return
        try:
            self.client[j] = self.pool.swap_in(host)
        except OutOfMemory:
            self.pool.free_mem(host, Tier.HOST)
            self.client.pop(j)

    @rule(n=st.integers(1, 8), host=st.booleans())
    def evict(self, n: int, host: bool) -> None:
        self.pool.evict(n, Tier.HOST if host else Tier.DEVICE)

    @rule(i=st.integers(0, 100), n=st.integers(1, 3))
    def pin_indexed_blocks(self, i: int, n: int) -> None:
        """A transfer pins index blocks by id: locks on any nodes, not only match paths."""
        ids = [b for b in range(12) if self.pool.tree.node_of(b, Tier.DEVICE) is not None]
        if ids:
            handle = self.pool.pin_blocks(ids[i % len(ids) :][:n], owner="transfer")
            if handle:
                self.handles.append((handle, []))

    @invariant()
    def lru_front_is_the_oldest_evictable_node(self) -> None:
        """The evictable sets' heap hands out what a scan of the whole tree would pick."""
        tree = self.pool.tree
        for tier in Tier:
            scan = [
                (n.last_access, n.node_id)
                for n in tree.nodes()
                if n.tier == tier
                and not n.lock_ref
                and all(
                    c.tier == Tier.HOST if tier == Tier.DEVICE else False
                    for c in n.children.values()
                )
            ]
            front = tree.pop_lru(tier)
            if front is None:
                assert not scan
                continue
            assert (front.last_access, front.node_id) == min(scan)
            tree.requeue([front])

    @invariant()
    def consistent(self) -> None:
        self.pool.check_integrity()
        self._apply_events()
        # Pinned prefixes are never evicted.
        for _, hashes in self.handles:
            for h in hashes:
                assert h in self.cached[Tier.DEVICE] or h in self.cached[Tier.HOST]
        st_ = self.pool.stats()
        assert st_.index["device"] == len(self.cached[Tier.DEVICE])
        assert st_.index["host"] == len(self.cached[Tier.HOST])


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPoolMachine = PoolMachine.TestCase
