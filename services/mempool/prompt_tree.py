"""The prompt tree: a radix tree over token ids at block granularity.

    root ─┬─ [A B][C D]          one node = a run of whole blocks (edge compressed);
          │     └─ [E F]         children keyed by the bytes of their first block
          └─ [X Y]

Invariants (checked by `check`):
- every node but the root holds >= 1 whole block; `len(key) == num_blocks * block_bytes`;
- a node's blocks all live in one tier (device or host); children keyed by their first block;
- `lock_ref` of a node >= the sum of its children's: pinning a node pins its ancestors, so
  a pinned prefix is never evicted from under a deeper pinned node;
- block hashes chain from the root (`tokens.chain_hash`), one per block.

Only whole blocks are indexed: a request's partial tail block is never in the tree.

Every change of what is cached is recorded as a `TreeEvent` (stored / removed, with tier,
chained hashes and, for stored, the token bytes) for the KV-event publisher. Splitting a
node changes nothing cached and records nothing.

The tree is bookkeeping only: block ids, never the bytes. Allocation, copying and
freeing belong to the pool (`services/mempool/pool.py`).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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
        "hashes",
        "key",
        "last_access",
        "lock_ref",
        "node_id",
        "parent",
        "tier",
    )

    def __init__(
        self, key: bytes, blocks: list[int], hashes: list[int], tier: Tier, parent: Node | None
    ):
        self.node_id = next(_ids)
        self.key = key
        self.blocks = blocks
        self.hashes = hashes
        self.tier = tier
        self.parent = parent
        self.children: dict[bytes, Node] = {}
        self.lock_ref = 0
        self.last_access = 0.0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def parent_hash(self) -> int:
        p = self.parent
        return p.hashes[-1] if p is not None and p.hashes else ROOT_HASH

    def __repr__(self) -> str:
        return f"Node(id={self.node_id}, blocks={self.blocks}, tier={self.tier.name}, lock={self.lock_ref})"


@dataclass
class InsertOutcome:
    """What `PromptTree.insert` did with the caller's blocks."""

    added: list[int] = field(default_factory=list)  # caller blocks now owned by the tree
    duplicates: list[int] = field(
        default_factory=list
    )  # caller blocks whose tokens were cached already
    # Host-tier blocks replaced by the caller's device copies (the pool frees them).
    replaced_host: list[int] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)  # the path that now holds the tokens


class PromptTree:
    def __init__(self, block_size: int, clock: Callable[[], float]):
        self.block_size = block_size
        self.block_bytes = block_size * 4
        self.clock = clock
        self.root = Node(b"", [], [], Tier.DEVICE, None)
        self.root.lock_ref = 1  # the root is never evicted
        self.events: list[TreeEvent] = []
        self.num_blocks = {Tier.DEVICE: 0, Tier.HOST: 0}
        # Which node holds each indexed block, per tier (kept exact by every mutation).
        self.block_node: dict[Tier, dict[int, Node]] = {Tier.DEVICE: {}, Tier.HOST: {}}

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
                k = self._common_blocks(child.key, data, pos)
                child = self.split(child, k)
                klen = len(child.key)
            child.last_access = now
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
        bb = self.block_bytes
        assert len(data) == len(blocks) * bb
        out = InsertOutcome()
        path, matched_tokens = self.match(data)
        i = 0
        for node in path:
            mine = blocks[i : i + node.num_blocks]
            if node.tier == tier:
                out.duplicates.extend(b for b, t in zip(mine, node.blocks, strict=True) if b != t)
            elif node.tier == Tier.HOST and node.lock_ref == 0:
                # The caller holds fresh device copies of blocks cached on the host: keep those.
                out.replaced_host.extend(self.move_tier(node, list(mine), Tier.DEVICE))
                out.added.extend(mine)
            else:  # cached in another tier and in use there: the caller's copies are spare
                out.duplicates.extend(mine)
            i += node.num_blocks
        out.nodes = path
        if i < len(blocks):
            parent = path[-1] if path else self.root
            start = matched_tokens * 4
            key = data[start:]
            leaf = Node(
                key,
                list(blocks[i:]),
                block_hashes(parent.hashes[-1] if parent.hashes else ROOT_HASH, key, bb),
                tier,
                parent,
            )
            leaf.last_access = self.clock()
            parent.children[key[:bb]] = leaf
            self.num_blocks[tier] += leaf.num_blocks
            self._map(leaf)
            self._record(True, tier, leaf.hashes, leaf.parent_hash, key)
            out.added.extend(leaf.blocks)
            out.nodes.append(leaf)
        return out

    def split(self, node: Node, k: int) -> Node:
        """Split `node` after its first k blocks; return the new prefix node (0 < k < num_blocks)."""
        assert 0 < k < node.num_blocks and node.parent is not None
        bb = self.block_bytes
        prefix = Node(node.key[: k * bb], node.blocks[:k], node.hashes[:k], node.tier, node.parent)
        prefix.lock_ref = node.lock_ref
        prefix.last_access = node.last_access
        node.parent.children[prefix.key[:bb]] = prefix
        node.key, node.blocks, node.hashes = node.key[k * bb :], node.blocks[k:], node.hashes[k:]
        node.parent = prefix
        prefix.children[node.key[:bb]] = node
        self._map(prefix)
        return prefix

    def remove_leaf(self, node: Node) -> list[int]:
        """Drop an unpinned leaf; return its block ids (the pool frees them)."""
        assert not node.children and node.lock_ref == 0 and node.parent is not None
        del node.parent.children[node.key[: self.block_bytes]]
        node.parent = None
        self.num_blocks[node.tier] -= node.num_blocks
        self._unmap(node)
        self._record(False, node.tier, node.hashes)
        return node.blocks

    def move_tier(self, node: Node, new_blocks: list[int], tier: Tier) -> list[int]:
        """Point `node` at copies of its blocks in another tier; return the old block ids."""
        assert len(new_blocks) == node.num_blocks and tier != node.tier
        old = node.blocks
        self._record(False, node.tier, node.hashes)
        self.num_blocks[node.tier] -= node.num_blocks
        self._unmap(node)
        node.blocks, node.tier = list(new_blocks), tier
        self.num_blocks[tier] += node.num_blocks
        self._map(node)
        self._record(True, tier, node.hashes, node.parent_hash, node.key)
        return old

    def lock(self, node: Node) -> None:
        n: Node | None = node
        while n is not None and n is not self.root:
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: Node) -> None:
        n: Node | None = node
        while n is not None and n is not self.root:
            assert n.lock_ref > 0, f"unlock of unpinned {n}"
            n.lock_ref -= 1
            n = n.parent

    def _map(self, node: Node) -> None:
        owners = self.block_node[node.tier]
        for b in node.blocks:
            owners[b] = node

    def _unmap(self, node: Node) -> None:
        owners = self.block_node[node.tier]
        for b in node.blocks:
            del owners[b]

    def node_of(self, block: int, tier: Tier) -> Node | None:
        return self.block_node[tier].get(block)

    # ------------------------------------------------------------------- walks
    def nodes(self) -> Iterator[Node]:
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def is_attached(self, node: Node) -> bool:
        return node is self.root or node.parent is not None

    def _record(
        self,
        stored: bool,
        tier: Tier,
        hashes: list[int],
        parent_hash: int = ROOT_HASH,
        key: bytes = b"",
    ) -> None:
        self.events.append(
            TreeEvent(stored, tier, list(hashes), parent_hash, key if stored else b"")
        )

    def drain_events(self) -> list[TreeEvent]:
        events, self.events = self.events, []
        return events

    def check(self, deep: bool = True) -> None:
        """Assert the structural invariants of the module docstring (`deep` rehashes every block)."""
        bb = self.block_bytes
        counts = {Tier.DEVICE: 0, Tier.HOST: 0}
        stack = [self.root]
        while stack:
            n = stack.pop()
            child_locks = 0
            for first, c in n.children.items():
                assert c.parent is n, f"{c} has a wrong parent"
                assert c.num_blocks >= 1 and len(c.key) == c.num_blocks * bb, c
                assert first == c.key[:bb], f"{c} is keyed by another block"
                assert len(c.hashes) == c.num_blocks
                if deep:
                    parent_hash = n.hashes[-1] if n.hashes else ROOT_HASH
                    assert c.hashes == block_hashes(parent_hash, c.key, bb), f"{c} hashes"
                counts[c.tier] += c.num_blocks
                child_locks += c.lock_ref
                stack.append(c)
            if n is not self.root:
                assert n.lock_ref >= child_locks, f"{n} is pinned less than its children"
        assert counts == self.num_blocks, f"block counts {counts} != {self.num_blocks}"
        for tier, owners in self.block_node.items():
            assert len(owners) == counts[tier], f"{tier.name}: block map has {len(owners)} entries"
            for b, node in owners.items():
                assert node.tier == tier and b in node.blocks and self.is_attached(node), (
                    f"block {b} maps to {node}"
                )
