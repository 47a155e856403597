"""The prompt tree: a radix tree over token ids at block granularity.

    root ─┬─ [A B][C D]          one node = a run of whole blocks (edge compressed);
          │     └─ [E F]         children keyed by the bytes of their first block
          └─ [X Y]

Invariants (checked by `check`):
- every node but the root holds >= 1 whole block; `len(key) == num_blocks * block_bytes`;
- a node's blocks all live in one tier (device or host); children keyed by their first block;
  `device_children` counts the children on the device tier;
- `lock_ref` of a node >= the sum of its children's: pinning a node pins its ancestors, so
  a pinned prefix is never evicted from under a deeper pinned node; `pinned_blocks[tier]`
  counts the blocks of the nodes with `lock_ref > 0`;
- `evictable[tier]` is exactly the set of attached, unpinned nodes of `tier` whose blocks may
  leave it without stranding a descendant: on the device, no child on the device (host
  children stay; the node is demoted or dropped); on the host, no child at all. Every such
  node has an entry (last_access, node_id) in `lru[tier]`, a heap with lazy deletion: an
  entry whose node left the set or was touched since is stale and skipped, so eviction pops
  the least recently used evictable nodes without walking the tree;
- block hashes chain from the root (`tokens.block_hashes`), one per block. A node's `hashes`
  may be None until first needed (events drained, the node removed or moved): inserting
  computes none, `drain_events` pays for them (see `memserve bench mempool`).

Only whole blocks are indexed: a request's partial tail block is never in the tree.

Every change of what is cached is recorded as a `TreeEvent` (stored / removed, with tier,
chained hashes and, for stored, the token bytes) for the KV-event publisher. Splitting a
node changes nothing cached and records nothing.

The tree is bookkeeping only: block ids, never the bytes. Allocation, copying and
freeing belong to the pool (`services/mempool/pool.py`).
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from common.tokens import ROOT_HASH, block_hashes


class Tier(enum.IntEnum):
    DEVICE = 0
    HOST = 1


@dataclass
class TreeEvent:
    stored: bool
    tier: Tier
    hashes: list[int]
    parent_hash: int = ROOT_HASH
    token_bytes: bytes = b""  # stored only: the tokens of the blocks, in order


_ids = itertools.count(1)


class Node:
    __slots__ = (
        "blocks",
        "children",
        "device_children",
        "hashes",
        "key",
        "last_access",
        "lock_ref",
        "node_id",
        "parent",
        "tier",
    )

    def __init__(
        self,
        key: bytes,
        blocks: list[int],
        hashes: list[int] | None,
        tier: Tier,
        parent: Node | None,
    ):
        self.node_id = next(_ids)
        self.key = key
        self.blocks = blocks
        self.hashes = hashes
        self.tier = tier
        self.parent = parent
        self.children: dict[bytes, Node] = {}
        self.device_children = 0
        self.lock_ref = 0
        self.last_access = 0.0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def __repr__(self) -> str:
        return f"Node(id={self.node_id}, blocks={self.blocks}, tier={self.tier.name}, lock={self.lock_ref})"


class _Stored:
    """A stored event whose hashes are computed when drained: `key` (whole blocks) was
    indexed under `parent` in `tier`, by the node `node` (which may since be split: it
    then holds a tail of `key`)."""

    __slots__ = ("key", "node", "parent", "tier")

    def __init__(self, tier: Tier, parent: Node, key: bytes, node: Node):
        self.tier, self.parent, self.key, self.node = tier, parent, key, node


@dataclass
class InsertOutcome:
    """What `PromptTree.insert` did with the caller's blocks."""

    # Caller blocks now owned by the tree (`added`), in two parts: those that replaced host
    # copies, and the new leaf's.
    moved: list[int] = field(default_factory=list)
    leaf: Node | None = None
    duplicates: list[int] = field(
        default_factory=list
    )  # caller blocks whose tokens were cached already
    # Host-tier blocks replaced by the caller's device copies (the pool frees them).
    replaced_host: list[int] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)  # the path that now holds the tokens

    @property
    def added(self) -> list[int]:
        return self.moved + (self.leaf.blocks if self.leaf is not None else [])


class PromptTree:
    def __init__(
        self,
        block_size: int,
        clock: Callable[[], float],
        max_blocks: dict[Tier, int] | None = None,
    ):
        self.block_size = block_size
        self.block_bytes = block_size * 4
        self.clock = clock
        self.root = Node(b"", [], [], Tier.DEVICE, None)
        self.root.lock_ref = 1  # the root is never evicted
        self.events: list[TreeEvent | _Stored] = []
        self.num_blocks = {Tier.DEVICE: 0, Tier.HOST: 0}
        self.pinned_blocks = {Tier.DEVICE: 0, Tier.HOST: 0}
        # Which node holds each indexed block, per tier, by block id (None: not indexed;
        # sized by `max_blocks` or grown on demand; kept exact by every mutation). An array,
        # so a prompt's blocks are mapped in one step.
        sizes = max_blocks or {}
        self.holder: dict[Tier, np.ndarray] = {
            tier: np.zeros(sizes.get(tier, 0), dtype=np.int64) for tier in Tier
        }  # node_id per block id, 0: none
        self._sized = max_blocks is not None
        self._by_id: dict[int, Node] = {}  # attached nodes by node_id
        self.evictable: dict[Tier, set[Node]] = {Tier.DEVICE: set(), Tier.HOST: set()}
        self.lru: dict[Tier, list[tuple[float, int, Node]]] = {Tier.DEVICE: [], Tier.HOST: []}

    # ------------------------------------------------------------------ lookups
    def match(self, data: bytes) -> tuple[list[Node], int]:
        """Longest cached prefix of `data` in whole blocks: (path of nodes, tokens matched).
        A node matched only in part is split so the path ends exactly at the match."""
        now = self.clock()
        bb = self.block_bytes
        node = self.root
        pos = 0
        path: list[Node] = []
        end = len(data) - len(data) % bb
        while pos < end:
            child = node.children.get(data[pos : pos + bb])
            if child is None:
                break
            klen = len(child.key)
            if data[pos : pos + klen] != child.key:
                child = self.split(child, self._common_blocks(child.key, data, pos))
                klen = len(child.key)
            child.last_access = now
            if child in self.evictable[child.tier]:  # a new LRU position
                heapq.heappush(self.lru[child.tier], (now, child.node_id, child))
            path.append(child)
            pos += klen
            node = child
        return path, pos // 4

    def _common_blocks(self, key: bytes, data: bytes, pos: int) -> int:
        bb = self.block_bytes
        k = 1  # the first block matched through the children dict
        while (k + 1) * bb <= len(key) and data[pos + k * bb : pos + (k + 1) * bb] == key[
            k * bb : (k + 1) * bb
        ]:
            k += 1
        return k

    # ---------------------------------------------------------------- mutations
    def insert(self, data: bytes, blocks: list[int], tier: Tier) -> InsertOutcome:
        """Index `len(blocks)` whole blocks of tokens `data` (exactly that many blocks' bytes)."""
        path, matched_tokens = self.match(data)
        return self.insert_after(path, matched_tokens, data, blocks, tier)

    def insert_after(
        self,
        path: list[Node],
        matched_tokens: int,
        data: bytes,
        blocks: list[int],
        tier: Tier,
        block_index: np.ndarray | None = None,
    ) -> InsertOutcome:
        """`insert`, given `match(data)`'s result (so the pool walks the tree once);
        `block_index` is `blocks` as an index array when the caller has one."""
        bb = self.block_bytes
        assert len(data) == len(blocks) * bb
        out = InsertOutcome()
        i = 0
        for node in path:
            nb = len(node.blocks)
            mine = blocks[i : i + nb]
            if node.tier == tier:
                if mine != node.blocks:
                    out.duplicates += [b for b, t in zip(mine, node.blocks, strict=True) if b != t]
            elif node.tier == Tier.HOST and node.lock_ref == 0:
                # The caller holds fresh device copies of blocks cached on the host: keep those.
                out.replaced_host.extend(self.move_tier(node, mine, Tier.DEVICE))
                out.moved.extend(mine)
            else:  # cached in another tier and in use there: the caller's copies are spare
                out.duplicates.extend(mine)
            i += nb
        out.nodes = path
        if i < len(blocks):
            parent = path[-1] if path else self.root
            key = data[matched_tokens * 4 :]
            leaf = Node(key, blocks[i:], None, tier, parent)
            leaf.last_access = self.clock()
            parent.children[key[:bb]] = leaf
            self.num_blocks[tier] += len(leaf.blocks)
            self._map(leaf, None if block_index is None else block_index[i:])
            self.events.append(_Stored(tier, parent, key, leaf))
            if tier == Tier.DEVICE:
                parent.device_children += 1
            if parent is not self.root:
                self._refresh(parent)  # its first child (on the device) keeps it
            self._refresh(leaf)
            out.leaf = leaf
            out.nodes.append(leaf)
        return out

    def split(self, node: Node, k: int) -> Node:
        """Split `node` after its first k blocks; return the new prefix node (0 < k < num_blocks).
        The prefix takes the node's place under its parent, in the same tier, so no node
        changes evictability: the prefix has a child in its own tier."""
        assert 0 < k < node.num_blocks and node.parent is not None
        bb = self.block_bytes
        hashes = node.hashes
        prefix = Node(
            node.key[: k * bb],
            node.blocks[:k],
            None if hashes is None else hashes[:k],
            node.tier,
            node.parent,
        )
        prefix.lock_ref = node.lock_ref
        prefix.last_access = node.last_access
        prefix.device_children = int(node.tier == Tier.DEVICE)
        node.parent.children[prefix.key[:bb]] = prefix
        node.key, node.blocks = node.key[k * bb :], node.blocks[k:]
        node.hashes = None if hashes is None else hashes[k:]
        node.parent = prefix
        prefix.children[node.key[:bb]] = node
        self._map(prefix)
        return prefix

    def remove_leaf(self, node: Node) -> list[int]:
        """Drop an unpinned leaf; return its block ids (the pool frees them)."""
        assert not node.children and node.lock_ref == 0 and node.parent is not None
        hashes = self.hashes_of(node)  # the removed event names them; the parent is needed
        parent = node.parent
        del parent.children[node.key[: self.block_bytes]]
        node.parent = None
        self.evictable[node.tier].discard(node)
        self.num_blocks[node.tier] -= node.num_blocks
        self._unmap(node)
        del self._by_id[node.node_id]
        self.events.append(TreeEvent(False, node.tier, list(hashes)))
        if node.tier == Tier.DEVICE:
            parent.device_children -= 1
        self._refresh(parent)
        return node.blocks

    def move_tier(self, node: Node, new_blocks: list[int], tier: Tier) -> list[int]:
        """Point `node` at copies of its blocks in another tier; return the old block ids."""
        assert len(new_blocks) == node.num_blocks and tier != node.tier
        hashes = self.hashes_of(node)
        old = node.blocks
        n = len(old)
        self.events.append(TreeEvent(False, node.tier, list(hashes)))
        self.evictable[node.tier].discard(node)
        self.num_blocks[node.tier] -= n
        if node.lock_ref:
            self.pinned_blocks[node.tier] -= n
            self.pinned_blocks[tier] += n
        self._unmap(node)
        node.blocks, node.tier = list(new_blocks), tier
        self.num_blocks[tier] += n
        self._map(node)
        parent = node.parent
        assert parent is not None
        parent.device_children += 1 if tier == Tier.DEVICE else -1
        self.events.append(TreeEvent(True, tier, list(hashes), self._last_hash(parent), node.key))
        self._refresh(node)
        if parent is not self.root:
            self._refresh(parent)
        return old

    def lock(self, node: Node) -> None:
        n: Node | None = node
        root = self.root
        while n is not None and n is not root:
            if not n.lock_ref:
                self.pinned_blocks[n.tier] += len(n.blocks)
                self.evictable[n.tier].discard(n)
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: Node) -> None:
        n: Node | None = node
        root = self.root
        while n is not None and n is not root:
            assert n.lock_ref > 0, f"unlock of unpinned {n}"
            n.lock_ref -= 1
            if not n.lock_ref:
                self.pinned_blocks[n.tier] -= len(n.blocks)
                self._refresh(n)
            n = n.parent

    def _is_evictable(self, n: Node) -> bool:
        return (
            not n.lock_ref
            and n.parent is not None
            and (not n.device_children if n.tier == Tier.DEVICE else not n.children)
        )

    def _refresh(self, n: Node) -> None:
        """Bring `n`'s membership in `evictable` (and its LRU entry) up to date."""
        members = self.evictable[n.tier]
        if self._is_evictable(n):
            if n not in members:
                members.add(n)
                self._push(n)
        else:
            members.discard(n)

    def _push(self, n: Node) -> None:
        heap = self.lru[n.tier]
        heapq.heappush(heap, (n.last_access, n.node_id, n))
        if len(heap) > 2 * len(self.evictable[n.tier]) + 1024:  # mostly stale: rebuild
            fresh = [(m.last_access, m.node_id, m) for m in self.evictable[n.tier]]
            heapq.heapify(fresh)
            self.lru[n.tier] = fresh

    def pop_lru(self, tier: Tier, skip: set[Node] | None = None) -> Node | None:
        """The least recently used evictable node of `tier` (its entry is consumed: a caller
        that leaves it in the tree hands it back with `requeue`); None when there is none."""
        heap = self.lru[tier]
        members = self.evictable[tier]
        while heap:
            last_access, _, n = heapq.heappop(heap)
            if n in members and n.last_access == last_access and (skip is None or n not in skip):
                return n
        return None

    def requeue(self, nodes: Iterable[Node]) -> None:
        for n in nodes:
            if n in self.evictable[n.tier]:
                heapq.heappush(self.lru[n.tier], (n.last_access, n.node_id, n))

    def _map(self, node: Node, index: np.ndarray | None = None) -> None:
        idx = np.array(node.blocks, dtype=np.intp) if index is None else index
        holder = self.holder[node.tier]
        top = 0 if self._sized else int(idx.max()) + 1
        if top > len(holder):
            grown = np.zeros(max(top, 2 * len(holder)), dtype=np.int64)
            grown[: len(holder)] = holder
            holder = self.holder[node.tier] = grown
        holder[idx] = node.node_id
        self._by_id[node.node_id] = node

    def _unmap(self, node: Node) -> None:
        self.holder[node.tier][np.array(node.blocks, dtype=np.intp)] = 0

    def node_of(self, block: int, tier: Tier) -> Node | None:
        holder = self.holder[tier]
        return self._by_id.get(int(holder[block])) if 0 <= block < len(holder) else None

    # ------------------------------------------------------------------ hashes
    def hashes_of(self, node: Node) -> list[int]:
        """`node`'s chained block hashes, computed (and kept) on first use."""
        if node.hashes is not None:
            return node.hashes
        todo = []  # node and its ancestors without hashes, deepest first
        n: Node | None = node
        while n is not None and n.hashes is None:
            todo.append(n)
            n = n.parent
        assert n is not None, f"{node} is detached and has no hashes"
        parent_hash = n.hashes[-1] if n.hashes else ROOT_HASH
        for m in reversed(todo):
            m.hashes = block_hashes(parent_hash, m.key, self.block_bytes)
            parent_hash = m.hashes[-1]
        assert node.hashes is not None
        return node.hashes

    def _last_hash(self, node: Node) -> int:
        return ROOT_HASH if node is self.root else self.hashes_of(node)[-1]

    # ------------------------------------------------------------------- walks
    def nodes(self) -> Iterator[Node]:
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def snapshot(self, max_blocks: int) -> tuple[list[tuple[Tier, list[int]]], bool]:
        """The indexed blocks as (tier, chained hashes) runs, one per node, breadth first
        from the root, at most `max_blocks` of them: a run's ancestors always come first,
        so a capped snapshot names whole prefixes only. Returns (runs, truncated)."""
        runs: list[tuple[Tier, list[int]]] = []
        left = max(0, max_blocks)
        level: list[Node] = list(self.root.children.values())
        while level:
            below: list[Node] = []
            for n in level:
                if left <= 0:
                    return runs, True
                hashes = self.hashes_of(n)
                runs.append((n.tier, hashes[:left]))
                if len(hashes) > left:
                    return runs, True
                left -= len(hashes)
                below.extend(n.children.values())
            level = below
        return runs, False

    def is_attached(self, node: Node) -> bool:
        return node is self.root or node.parent is not None

    def drain_events(self) -> list[TreeEvent]:
        """The events since the last drain, in order; stored events get their hashes here."""
        events, self.events = self.events, []
        out = []
        for e in events:
            if isinstance(e, TreeEvent):
                out.append(e)
                continue
            parent_hash = self._last_hash(e.parent)
            node = e.node
            if node.key is e.key and (node.hashes is not None or node.parent is e.parent):
                hashes = self.hashes_of(node)  # not split since stored
            else:  # split: it holds a tail of the key
                hashes = block_hashes(parent_hash, e.key, self.block_bytes)
                if node.hashes is None:
                    node.hashes = hashes[len(hashes) - len(node.blocks) :]
            # The node's own list: hash lists are replaced, never changed in place.
            out.append(TreeEvent(True, e.tier, hashes, parent_hash, e.key))
        return out

    def check(self, deep: bool = True) -> None:
        """Assert the structural invariants of the module docstring (`deep` rehashes every
        block, computing none it does not have)."""
        bb = self.block_bytes
        counts = {Tier.DEVICE: 0, Tier.HOST: 0}
        pinned = {Tier.DEVICE: 0, Tier.HOST: 0}
        evictable: dict[Tier, set[Node]] = {Tier.DEVICE: set(), Tier.HOST: set()}
        stack: list[tuple[Node, int]] = [(self.root, ROOT_HASH)]
        while stack:
            n, last_hash = stack.pop()
            child_locks = 0
            device_children = 0
            for first, c in n.children.items():
                assert c.parent is n, f"{c} has a wrong parent"
                assert c.num_blocks >= 1 and len(c.key) == c.num_blocks * bb, c
                assert first == c.key[:bb], f"{c} is keyed by another block"
                assert c.hashes is None or len(c.hashes) == c.num_blocks
                c_last = 0
                if deep:
                    expected = block_hashes(last_hash, c.key, bb)
                    assert c.hashes is None or c.hashes == expected, f"{c} hashes"
                    c_last = expected[-1]
                counts[c.tier] += c.num_blocks
                if c.lock_ref:
                    pinned[c.tier] += c.num_blocks
                child_locks += c.lock_ref
                device_children += c.tier == Tier.DEVICE
                stack.append((c, c_last))
            if n is not self.root:
                assert n.lock_ref >= child_locks, f"{n} is pinned less than its children"
                assert n.device_children == device_children, f"{n} device children"
                if self._is_evictable(n):
                    evictable[n.tier].add(n)
        assert counts == self.num_blocks, f"block counts {counts} != {self.num_blocks}"
        assert pinned == self.pinned_blocks, f"pinned {pinned} != {self.pinned_blocks}"
        for tier in Tier:
            assert evictable[tier] == self.evictable[tier], (
                f"{tier.name}: evictable set off by {evictable[tier] ^ self.evictable[tier]}"
            )
            live = {(n.last_access, n.node_id) for n in evictable[tier]}
            queued = {(a, i) for a, i, _ in self.lru[tier]}
            assert live <= queued, f"{tier.name}: evictable nodes missing from the LRU heap"
        for tier, holder in self.holder.items():
            held = [(int(b), self._by_id[int(holder[b])]) for b in np.flatnonzero(holder)]
            assert len(held) == counts[tier], f"{tier.name}: block map has {len(held)} entries"
            for b, node in held:
                assert node.tier == tier and b in node.blocks and self.is_attached(node), (
                    f"block {b} maps to {node}"
                )
