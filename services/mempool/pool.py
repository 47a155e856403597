"""MemPool core: one instance's KV blocks, who owns each, and the prompt-tree index.

Pure and synchronous: the daemon's asyncio shell (service.py) calls it between socket
reads, so no two calls interleave. Copies between tiers go through `copy_blocks`, which the
shell backs with the real regions.

Every block of a tier is in exactly one state, and `check_integrity` proves it:

    free ──alloc_mem──▶ client (owned by a named client: a worker, a transfer in flight)
      ▲                    │ insert (whole blocks; duplicates and the partial tail are freed)
      │                    ▼
      └──evict / delete── index (in the prompt tree; pinned while a match handle holds it)

A match pins the matched path until `release`; pinned blocks are never evicted or deleted.
An allocation that cannot be met evicts unpinned index blocks, least recently used leaves
first: device blocks are demoted to the host tier when it has room, else dropped.

KunServe split mode (`split` / `merge`, device tier): blocks become sub-blocks of fewer
layers in place, client ownership carrying over; the device index is emptied first and is
read-only while split. `shrink` lowers the device ceiling; free blocks above it are
'retired' (counted with the free ones by `check_integrity`) until the capacity drops.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common.errors import ErrorKind, MemServeError
from common.tokens import TokenLike, as_token_bytes
from services.mempool.allocator import BlockAllocator
from services.mempool.client_blocks import ClientBlocks
from services.mempool.prompt_tree import Node, PromptTree, Tier, TreeEvent

CopyBlocks = Callable[[Tier, Sequence[int], Tier, Sequence[int]], None]


ORPHAN = "<orphan>"  # owner of blocks whose client went away while a transfer used them


class MemPoolError(MemServeError):
    """A refused call; the message is for the caller. The pool is unchanged."""


class OutOfMemory(MemPoolError):
    kind = ErrorKind.OUT_OF_MEMORY


class InvalidBlocks(MemPoolError):
    kind = ErrorKind.BAD_REQUEST


class UnknownHandle(MemPoolError):
    kind = ErrorKind.UNKNOWN_ID


@dataclass
class MatchResult:
    handle: int  # 0 when nothing matched (nothing pinned)
    num_tokens: int
    block_ids: list[int]
    tiers: list[Tier]


@dataclass
class InsertResult:
    num_indexed_tokens: int  # whole-block tokens of the prompt now in the index
    # The index's block for each whole block (may differ from the caller's). With
    # `pin_owner`: only the pinned, device-resident prefix of them.
    index_block_ids: list[int]
    index_tiers: list[Tier]  # where each of those lives (a pinned host copy stays on the host)
    freed_block_ids: list[int]  # caller blocks freed: duplicates and the partial tail
    handle: int = 0  # with `pin_owner`: pins `index_block_ids` until `release(handle)`


@dataclass
class PoolStats:
    capacity: dict[str, int] = field(default_factory=dict)
    free: dict[str, int] = field(default_factory=dict)
    client: dict[str, int] = field(default_factory=dict)
    index: dict[str, int] = field(default_factory=dict)
    pinned: dict[str, int] = field(default_factory=dict)
    match_calls: int = 0
    match_hits: int = 0
    matched_tokens: int = 0
    queried_tokens: int = 0
    evicted_blocks: int = 0
    demoted_blocks: int = 0
    promoted_blocks: int = 0


@dataclass
class _Handle:
    nodes: list[Node]  # each pinned once (a match pins its deepest node)
    owner: str


class MemPool:
    def __init__(
        self,
        block_size: int,
        device_blocks: int,
        host_blocks: int = 0,
        *,
        device_max_blocks: int | None = None,
        copy_blocks: CopyBlocks | None = None,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.block_size = block_size
        self.alloc = {
            Tier.DEVICE: BlockAllocator(device_blocks, device_max_blocks),
            Tier.HOST: BlockAllocator(host_blocks),
        }
        self.client = {tier: ClientBlocks(self.alloc[tier].max_blocks) for tier in Tier}
        self.tree = PromptTree(
            block_size, clock, {tier: a.max_blocks for tier, a in self.alloc.items()}
        )
        self.copy_blocks = copy_blocks or (lambda *_: None)
        self.ttl_s = ttl_s
        self.clock = clock
        self.handles: dict[int, _Handle] = {}
        # Device client blocks a transfer is reading or writing: nobody may free, swap or
        # insert them until the transfer ends (`unmark_busy`).
        self.busy: Counter[int] = Counter()
        self._handle_ids = itertools.count(1)
        self.counters = PoolStats()

    # ------------------------------------------------------------------- memory
    def alloc_mem(self, n: int, tier: Tier = Tier.DEVICE, owner: str = "") -> list[int]:
        if n < 0:
            raise MemPoolError(f"cannot allocate {n} blocks")
        self._make_room(tier, n)
        ids = self.alloc[tier].allocate(n)
        self.client[tier].give(ids, owner)
        return ids

    def free_mem(self, ids: Sequence[int], tier: Tier = Tier.DEVICE) -> None:
        self.check_client(ids, tier)
        self.client[tier].take(ids)
        self.alloc[tier].free(ids)

    def swap_out(self, ids: Sequence[int]) -> list[int]:
        """Client device blocks -> client host blocks with the same bytes; device ones freed."""
        return self._swap(ids, Tier.DEVICE, Tier.HOST)

    def swap_in(self, ids: Sequence[int]) -> list[int]:
        return self._swap(ids, Tier.HOST, Tier.DEVICE)

    def _swap(self, ids: Sequence[int], src: Tier, dst: Tier) -> list[int]:
        if self.split_factor != 1:  # host blocks are whole blocks, device ones sub-blocks
            raise MemPoolError("swap between tiers is not available while split")
        self.check_client(ids, src)  # refuses blocks a transfer is using
        owners = self.client[src].owners(ids)
        self._make_room(dst, len(ids))
        new = self.alloc[dst].allocate(len(ids))
        self.copy_blocks(src, ids, dst, new)
        self.client[src].take(ids)
        by_owner: dict[str, list[int]] = {}
        for b, owner in zip(new, owners, strict=True):
            by_owner.setdefault(owner, []).append(b)
        for owner, blocks in by_owner.items():
            self.client[dst].give(blocks, owner)
        self.alloc[src].free(ids)
        return new

    def grow(self, device_blocks: int) -> None:
        """More device blocks (up to the region's reservation), e.g. memory freed by KunServe."""
        try:
            self.alloc[Tier.DEVICE].grow(device_blocks)
        except ValueError as exc:
            raise MemPoolError(str(exc)) from None

    # ------------------------------------------------------- split mode (KunServe)
    @property
    def split_factor(self) -> int:
        return self.alloc[Tier.DEVICE].split_factor

    def split(self, g: int) -> None:
        """Device blocks of L layers become g sub-blocks of L/g layers each, in place (see
        `BlockAllocator.split`); client ownership carries over to every sub-block.

        The device index is emptied first (its unpinned blocks are demoted or dropped) and
        stays read-only while split: device inserts are refused and matches do not promote.
        Refused, nothing changed, while a transfer uses device blocks or a match pins device
        index blocks; refused after evicting when the device index could not be emptied."""
        alloc = self.alloc[Tier.DEVICE]
        if g < 1 or alloc.split_factor != 1:
            raise MemPoolError(f"cannot split into {g}: split factor is {alloc.split_factor}")
        if self.busy:
            raise MemPoolError(f"cannot split: {len(self.busy)} device blocks in transfer")
        if self.tree.pinned_blocks[Tier.DEVICE]:
            raise MemPoolError(
                f"cannot split: {self.tree.pinned_blocks[Tier.DEVICE]} device index blocks pinned"
            )
        while self.tree.num_blocks[Tier.DEVICE]:
            if not self.evict(self.tree.num_blocks[Tier.DEVICE], Tier.DEVICE):
                raise MemPoolError("cannot split: the device index could not be emptied")
        alloc.split(g)
        self.client[Tier.DEVICE].split(g)

    def merge(self) -> None:
        """Back to whole device blocks; refused, nothing changed, while a transfer uses
        device blocks or unless every aligned run of sub-blocks is all free or all held by
        one client (`BlockAllocator.merge`)."""
        alloc, client = self.alloc[Tier.DEVICE], self.client[Tier.DEVICE]
        if self.busy:
            raise MemPoolError(f"cannot merge: {len(self.busy)} device blocks in transfer")
        g = alloc.split_factor
        try:
            alloc.merge(client.get)
        except ValueError as exc:
            raise MemPoolError(str(exc)) from None
        client.merge(g)

    def alloc_aligned(self, n: int, owner: str = "") -> list[list[int]]:
        """n whole blocks' worth of device sub-blocks (runs of `split_factor`, aligned), for
        `owner`; refused (OutOfMemory), nothing allocated, when too few runs are free."""
        try:
            runs = self.alloc[Tier.DEVICE].allocate_aligned(n)
        except ValueError as exc:
            raise OutOfMemory(str(exc)) from None
        self.client[Tier.DEVICE].give([b for run in runs for b in run], owner)
        return runs

    def shrink(self, target: int) -> list[int]:
        """Lower the device ceiling to `target` (`BlockAllocator.shrink`); returns the
        client blocks at or above it, for their owners to move. Index blocks above it go
        when evicted; `pending_shrink` is empty once all of them are free."""
        try:
            live = self.alloc[Tier.DEVICE].shrink(target)
        except ValueError as exc:
            raise MemPoolError(str(exc)) from None
        held = self.client[Tier.DEVICE].held(live)
        return [b for b, h in zip(live, held, strict=True) if h]

    @property
    def pending_shrink(self) -> list[int]:
        return self.alloc[Tier.DEVICE].pending_shrink

    def chown(self, ids: Sequence[int], owner: str, *, expect: str = "") -> int:
        """Device client blocks `ids` pass to `owner` (a group taking a member's blocks,
        or a home taking a request back); with `expect`, only if that client holds them
        all. Refused (nothing changes) for ids that are not client blocks."""
        if not owner:
            raise InvalidBlocks("chown needs an owner")
        ids = list(ids)
        self.check_client(ids, Tier.DEVICE, in_use_ok=True)
        if expect:
            wrong = [
                b
                for b, o in zip(ids, self.client[Tier.DEVICE].owners(ids), strict=True)
                if o != expect
            ]
            if wrong:
                raise InvalidBlocks(f"blocks {wrong[:8]} are not held by {expect!r}")
        self.client[Tier.DEVICE].give(ids, owner)
        return len(ids)

    def release_owner(self, owner: str) -> int:
        """Free every client block and drop every handle of `owner` (a client that died).
        Blocks a transfer is still using pass to `ORPHAN` and are freed when it ends."""
        freed = 0
        for tier in Tier:
            ids = [b for b, o in self.client[tier].items() if o == owner]
            busy = [b for b in ids if tier == Tier.DEVICE and self.busy[b]]
            for b in busy:
                self.client[tier][b] = ORPHAN
            ids = [b for b in ids if b not in busy]
            if ids:
                self.free_mem(ids, tier)
                freed += len(ids)
        for hid in [h for h, v in self.handles.items() if v.owner == owner]:
            self.release(hid)
        return freed

    # -------------------------------------------------------------------- index
    def match(
        self,
        tokens: TokenLike,
        owner: str = "",
        promote: bool = True,
        max_tokens: int | None = None,
    ) -> MatchResult:
        """Longest cached prefix in whole blocks, pinned until `release(handle)`. With
        `promote`, host-tier blocks on the path are copied back to the device tier, and the
        match ends where that is impossible, so every returned block is on the device.
        `max_tokens` caps the match (a worker leaves the last prompt token to compute)."""
        data = as_token_bytes(tokens)
        if max_tokens is not None:
            data = data[: max(0, max_tokens) * 4]
        path, _ = self.tree.match(data)
        st = self.counters
        st.match_calls += 1
        st.queried_tokens += len(data) // 4
        if not path:
            return MatchResult(0, 0, [], [])
        hid, path = self._pin_path(path, owner, promote)
        if not path:
            return MatchResult(0, 0, [], [])
        blocks, tiers = _blocks_and_tiers(path)
        st.match_hits += 1
        st.matched_tokens += len(blocks) * self.block_size
        return MatchResult(hid, len(blocks) * self.block_size, blocks, tiers)

    def _pin_path(self, path: list[Node], owner: str, promote: bool) -> tuple[int, list[Node]]:
        """Pin a root-down path for `owner`: (handle, the pinned path). With `promote`, host
        nodes are brought to the device and the path ends where that is impossible; an
        empty path pins nothing (handle 0)."""
        self.tree.lock(path[-1])
        if promote:
            usable = self._promote(path)
            if usable < len(path):
                self.tree.unlock(path[-1])
                path = path[:usable]
                if not path:
                    return 0, []
                self.tree.lock(path[-1])
        hid = next(self._handle_ids)
        self.handles[hid] = _Handle([path[-1]], owner)
        return hid, path

    def _promote(self, path: list[Node]) -> int:
        """Bring host nodes of a pinned path to the device; return how many nodes are usable."""
        for i, node in enumerate(path):
            if node.tier == Tier.DEVICE:
                continue
            if self.split_factor != 1:  # the device index is read-only while split
                return i
            n = node.num_blocks
            if not self._make_room(Tier.DEVICE, n, strict=False):
                return i
            dev = self.alloc[Tier.DEVICE].allocate(n)
            self.copy_blocks(Tier.HOST, node.blocks, Tier.DEVICE, dev)
            self.alloc[Tier.HOST].free(self.tree.move_tier(node, dev, Tier.DEVICE))
            self.counters.promoted_blocks += n
        return len(path)

    def release(self, handle: int) -> None:
        h = self.handles.pop(handle, None)
        if h is None:
            raise UnknownHandle(f"unknown match handle {handle}")
        for node in h.nodes:
            self.tree.unlock(node)

    def insert(
        self,
        tokens: TokenLike,
        block_ids: Sequence[int],
        tier: Tier = Tier.DEVICE,
        tail_owner: str | None = None,
        pin_owner: str | None = None,
    ) -> InsertResult:
        """Index the whole blocks of `tokens`; `block_ids` cover every token (the last block
        may be partial). The caller gives up all of them: blocks new to the index are now
        index-owned, duplicates of cached blocks and the partial tail are freed. Idempotent:
        inserting the same tokens with the index's own blocks changes nothing. With
        `tail_owner`, the partial tail block stays allocated to that client instead.

        With `pin_owner`, the indexed path is also pinned for that owner, as a `match` with
        `promote` would pin it (host-tier nodes are brought to the device; the pin ends
        where that is impossible): `handle` and `index_block_ids` are that pin's."""
        if tier == Tier.DEVICE and self.split_factor != 1:
            raise MemPoolError("the device index is read-only while split")
        data = as_token_bytes(tokens)
        bs = self.block_size
        ntok = len(data) // 4
        ids = block_ids if isinstance(block_ids, list) else list(block_ids)  # only read
        if len(ids) != -(-ntok // bs):
            raise InvalidBlocks(
                f"{ntok} tokens need {-(-ntok // bs)} blocks of {bs}, got {len(ids)}"
            )
        owned = self.client[tier]
        idx = owned.index(ids)
        # Repeats: a set for short lists, array steps (no per-id hashing) for long ones.
        if (
            owned.has_repeats(idx)
            if idx is not None and len(ids) >= 512
            else len(set(ids)) != len(ids)
        ):
            raise InvalidBlocks(f"repeated block ids in {ids}")
        whole = ntok // bs
        if len(data) != whole * bs * 4:
            data = data[: whole * bs * 4]
        path, matched_tokens = self.tree.match(data)
        # Every block must be the caller's (a client block no transfer is using) or the
        # index's own block at that position (from an earlier match). Checked in a few
        # vectorized steps; only a refusal, or index blocks handed back, walks block by block.
        if (
            idx is None
            or not owned.owns_all(idx)
            or (tier == Tier.DEVICE and self.busy and not self.busy.keys().isdisjoint(ids))
        ):
            self._check_insert_blocks(ids, path, tier)
            idx = None
        outcome = self.tree.insert_after(
            path,
            matched_tokens,
            data,
            ids if whole == len(ids) else ids[:whole],
            tier,
            None if idx is None else idx if whole == len(ids) else idx[:whole],
        )
        tail = ids[whole:]
        freed = outcome.duplicates + ([] if tail_owner is not None else tail)
        if idx is not None:
            # Every block was the caller's: each whole one is now the index's or freed, and
            # so is the tail unless it is kept. One step for all of them.
            owned.take(idx if tail_owner is None else idx[:whole])
        else:
            owned.take(outcome.added + freed)
        if tail_owner is not None:
            owned.give(tail, tail_owner)
        self.alloc[tier].free(freed)
        if outcome.replaced_host:
            self.alloc[Tier.HOST].free(outcome.replaced_host)
        path = outcome.nodes
        handle = 0
        if pin_owner is not None and path:
            handle, path = self._pin_path(path, pin_owner, promote=True)
        index_ids, index_tiers = _blocks_and_tiers(path)
        return InsertResult(whole * bs, index_ids, index_tiers, freed, handle)

    def _check_insert_blocks(self, ids: list[int], path: list[Node], tier: Tier) -> None:
        shared = [(b, n.tier) for n in path for b in n.blocks]
        for j, b in enumerate(ids):
            if j < len(shared) and shared[j] == (b, tier):
                continue  # the index's own block at this position (from an earlier match)
            if b not in self.client[tier]:
                raise InvalidBlocks(f"block {b} ({tier.name.lower()}) is not allocated to a client")
            if tier == Tier.DEVICE and self.busy[b]:
                raise InvalidBlocks(f"block {b} is being transferred")

    def check_readable(self, ids: Sequence[int], tier: Tier = Tier.DEVICE) -> None:
        """Blocks a transfer may read: owned by a client, or indexed and pinned (so nothing
        evicts or frees them while their bytes move)."""
        for b, client_block in zip(ids, self.client[tier].held(ids), strict=True):
            if client_block:
                continue
            node = self.tree.node_of(b, tier)
            if node is None:
                raise InvalidBlocks(
                    f"block {b} ({tier.name.lower()}) is {self._state(b, tier)}: nothing to send"
                )
            if not node.lock_ref:
                raise InvalidBlocks(f"block {b} is indexed but not pinned: match it before sending")

    def delete(self, tokens: TokenLike) -> int:
        """Drop the cached blocks of exactly this prompt that nothing else needs: from the
        deepest matched node up, while the node is an unpinned leaf. Returns blocks dropped."""
        path, _ = self.tree.match(as_token_bytes(tokens))
        dropped = 0
        for node in reversed(path):
            if node.children or node.lock_ref:
                break
            tier = node.tier
            ids = self.tree.remove_leaf(node)
            self.alloc[tier].free(ids)
            dropped += len(ids)
        return dropped

    # ----------------------------------------------------------------- eviction
    def evict(self, n: int, tier: Tier = Tier.DEVICE, *, demote_only: bool = False) -> int:
        """Free up to n unpinned index blocks of `tier`, LRU leaves first; return how many.
        With `demote_only` (swap_out(n)), device blocks only move to the host, never drop.
        Candidates come from the tree's evictable set in LRU order, so the cost is the
        nodes evicted, not the size of the tree."""
        done = 0
        kept: set[Node] = set()  # evictable nodes this call could not move (requeued)
        while done < n:
            node = self.tree.pop_lru(tier, kept)
            if node is None:
                break
            k = min(node.num_blocks, n - done)
            if k < node.num_blocks:
                self.tree.split(node, node.num_blocks - k)
            if self._evict_node(node, tier, demote_only):
                done += k
            else:
                kept.add(node)
        self.tree.requeue(kept)
        self.counters.evicted_blocks += done
        return done

    def _evict_node(self, node: Node, tier: Tier, demote_only: bool = False) -> bool:
        k = node.num_blocks
        if tier == Tier.DEVICE and self._host_room(k):
            host = self.alloc[Tier.HOST].allocate(k)
            self.copy_blocks(Tier.DEVICE, node.blocks, Tier.HOST, host)
            self.alloc[Tier.DEVICE].free(self.tree.move_tier(node, host, Tier.HOST))
            self.counters.demoted_blocks += k
            return True
        if node.children or demote_only:
            return False
        self.alloc[tier].free(self.tree.remove_leaf(node))
        return True

    def _host_room(self, k: int) -> bool:
        host = self.alloc[Tier.HOST]
        if host.capacity == 0:
            return False
        if host.num_free < k:
            self.evict(k - host.num_free, Tier.HOST)
        return host.num_free >= k

    def _make_room(self, tier: Tier, n: int, strict: bool = True) -> bool:
        short = n - self.alloc[tier].num_free
        if short > 0:
            self.evict(short, tier)
        if self.alloc[tier].num_free >= n:
            return True
        if strict:
            raise OutOfMemory(
                f"{tier.name.lower()} tier: {n} blocks asked, {self.alloc[tier].num_free} free "
                f"and nothing more evictable"
            )
        return False

    def expire(self) -> int:
        """Drop unpinned leaves not used for `ttl_s` (a safety net; LRU does the real work)."""
        if self.ttl_s is None:
            return 0
        deadline = self.clock() - self.ttl_s
        dropped = 0
        changed = True
        while changed:  # a dropped leaf may leave a stale parent as the next leaf
            changed = False
            # Every unpinned leaf is evictable in its tier (it has no children at all).
            stale = [
                node
                for members in self.tree.evictable.values()
                for node in members
                if not node.children and node.last_access < deadline
            ]
            for node in stale:
                tier = node.tier
                self.alloc[tier].free(self.tree.remove_leaf(node))
                dropped += node.num_blocks
                changed = True
        return dropped

    def drain_events(self) -> list[TreeEvent]:
        return self.tree.drain_events()

    # ------------------------------------------------------------ introspection
    def mark_busy(self, ids: Sequence[int]) -> None:
        """A transfer starts reading or writing these device blocks (client-owned ones are
        guarded here; indexed ones are pinned with `pin_blocks`)."""
        held = self.client[Tier.DEVICE].held(ids)
        self.busy.update(b for b, client_block in zip(ids, held, strict=True) if client_block)

    def unmark_busy(self, ids: Sequence[int]) -> None:
        for b in ids:
            if not self.busy[b]:
                continue
            self.busy[b] -= 1
            if not self.busy[b]:
                del self.busy[b]
                if self.client[Tier.DEVICE].get(b) == ORPHAN:
                    del self.client[Tier.DEVICE][b]
                    self.alloc[Tier.DEVICE].free([b])

    def pin_blocks(self, ids: Sequence[int], owner: str = "") -> int:
        """Pin the index nodes holding these device blocks (for a transfer that reads them);
        returns a handle for `release`, 0 when none of them is indexed."""
        nodes: dict[int, Node] = {}
        for b in ids:
            node = self.tree.node_of(b, Tier.DEVICE)
            if node is not None:
                nodes[node.node_id] = node
        if not nodes:
            return 0
        for node in nodes.values():
            self.tree.lock(node)
        hid = next(self._handle_ids)
        self.handles[hid] = _Handle(list(nodes.values()), owner)
        return hid

    def check_client(self, ids: Sequence[int], tier: Tier, *, in_use_ok: bool = False) -> None:
        """Raise unless every id is a client block of `tier`; one a transfer is using is
        refused too unless `in_use_ok`."""
        owned = self.client[tier]
        idx = owned.index(ids)
        if (
            idx is not None
            and not owned.has_repeats(idx)
            and owned.owns_all(idx)
            and (in_use_ok or tier != Tier.DEVICE or self.busy.keys().isdisjoint(ids))
        ):
            return  # the common case, in a few vectorized steps; below: which and why
        if len(set(ids)) != len(ids):
            raise InvalidBlocks(f"repeated block ids in {list(ids)}")
        if not in_use_ok and tier == Tier.DEVICE:
            busy = [b for b in ids if self.busy[b]]
            if busy:
                raise InvalidBlocks(f"blocks {busy[:8]} are being transferred")
        owned = self.client[tier]
        bad = [b for b in ids if b not in owned]
        if bad:
            states = ", ".join(f"{b}: {self._state(b, tier)}" for b in bad[:8])
            raise InvalidBlocks(
                f"blocks not allocated to a client ({tier.name.lower()} tier): {states}"
            )

    def _state(self, block: int, tier: Tier) -> str:
        if not self.alloc[tier].is_valid(block):
            return "unknown id"
        if self.alloc[tier].is_free(block):
            return "free"
        if block in self.alloc[tier].retired_ids():
            return "retired (above the shrink ceiling)"
        return "owned by the index"

    def stats(self) -> PoolStats:
        st = self.counters
        index, pinned = self.tree.num_blocks, self.tree.pinned_blocks  # kept exact by the tree
        for tier in Tier:
            name = tier.name.lower()
            st.capacity[name] = self.alloc[tier].capacity
            st.free[name] = self.alloc[tier].num_free
            st.client[name] = len(self.client[tier])
            st.index[name] = index[tier]
            st.pinned[name] = pinned[tier]
        return st

    def check_integrity(self, deep: bool = True) -> None:
        """Assert: per tier, free + client + index blocks partition [0, capacity) exactly;
        each node's pin count equals the live handles at or below it."""
        self.tree.check(deep=deep)
        index: dict[Tier, list[int]] = {Tier.DEVICE: [], Tier.HOST: []}
        for node in self.tree.nodes():
            index[node.tier].extend(node.blocks)
        for tier in Tier:
            alloc = self.alloc[tier]
            alloc.check_integrity()
            free = alloc.free_ids() | alloc.retired_ids()  # retired: free above the ceiling
            self.client[tier].check()
            client = set(self.client[tier])
            idx = index[tier]
            name = tier.name.lower()
            assert len(idx) == len(set(idx)), f"{name}: a block is indexed twice"
            assert not (free & client), (
                f"{name}: free blocks owned by clients: {sorted(free & client)[:8]}"
            )
            assert not (free & set(idx)), (
                f"{name}: free blocks in the index: {sorted(free & set(idx))[:8]}"
            )
            assert not (client & set(idx)), (
                f"{name}: client blocks in the index: {sorted(client & set(idx))[:8]}"
            )
            if tier == Tier.DEVICE:
                stray = [b for b in self.busy if b not in client]
                assert not stray, f"blocks in transfer but not client-owned: {stray[:8]}"
            total = len(free) + len(client) + len(idx)
            assert total == alloc.capacity, (
                f"{name}: {total} blocks accounted for, capacity {alloc.capacity} (leak)"
            )
        expected: dict[int, int] = {}
        for h in self.handles.values():
            for pinned in h.nodes:
                assert self.tree.is_attached(pinned), f"handle pins a detached node {pinned}"
                n: Node | None = pinned
                while n is not None and n is not self.tree.root:
                    expected[n.node_id] = expected.get(n.node_id, 0) + 1
                    n = n.parent
        for node in self.tree.nodes():
            assert node.lock_ref == expected.get(node.node_id, 0), (
                f"{node} is pinned {node.lock_ref} times, live handles say {expected.get(node.node_id, 0)}"
            )


def _blocks_and_tiers(path: list[Node]) -> tuple[list[int], list[Tier]]:
    """The block ids along a path and the tier of each (one list operation per node)."""
    blocks: list[int] = []
    tiers: list[Tier] = []
    for node in path:
        blocks += node.blocks
        tiers += [node.tier] * len(node.blocks)
    return blocks, tiers
