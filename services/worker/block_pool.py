"""The engine's free list of KV block ids.

Invariant: every block id the pool holds is either free or allocated, never both; `free`
of an id that is not allocated is an error (double free), so a leak or a double free is
caught where it happens, not later as corrupted KV.

The pool's membership can change: a standalone engine owns every block of its KV cache
(`BlockPool(num_blocks)`), while a worker leases blocks from its MemPool daemon (`add`),
gives unused ones back (`take_free`) and hands finished requests' blocks to the daemon's
index (`disown`).

Retiring (a live restore): `retire(keep)` narrows the pool to the ids in `keep` for good.
Free ids outside it leave at once, allocated ones leave when they are freed (they are never
on the free list again, so never handed out); `retired()` lists what left. An id claimed
back (a lease arriving with KV) rejoins as allocated and leaves again when freed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class BlockPoolError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int = 0):
        if num_blocks < 0:
            raise ValueError(f"a KV pool cannot have {num_blocks} blocks")
        # FIFO reuse: a freed block goes to the back, so recently freed KV survives longest.
        self._free: deque[int] = deque(range(num_blocks))
        self._free_set: set[int] = set(self._free)
        self._allocated: set[int] = set()
        self._keep: frozenset[int] | None = None  # None: no retire, every id may be free
        self._retired: set[int] = set()

    def _kept(self, block_id: int) -> bool:
        return self._keep is None or block_id in self._keep

    @property
    def num_blocks(self) -> int:
        return len(self._free) + len(self._allocated)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_allocated(self) -> int:
        return len(self._allocated)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise BlockPoolError(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        self._free_set.difference_update(ids)
        self._allocated.update(ids)
        return ids

    def free(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        bad = [i for i in ids if i not in self._allocated]
        if bad or len(set(ids)) != len(ids):
            raise BlockPoolError(
                f"free of blocks that are not allocated (or repeated): {bad or ids}"
            )
        self._allocated.difference_update(ids)
        self._shelve(ids)

    def _shelve(self, ids: list[int]) -> None:
        """Free ids go on the free list, or leave the pool when they are retired."""
        back = [i for i in ids if self._kept(i)]
        if len(back) < len(ids):
            self._retired.update(i for i in ids if not self._kept(i))
        self._free.extend(back)
        self._free_set.update(back)

    def add(self, ids: Iterable[int]) -> None:
        """New free blocks (leased from the MemPool daemon)."""
        ids = list(ids)
        known = [i for i in ids if i in self._free_set or i in self._allocated]
        if known or len(set(ids)) != len(ids):
            raise BlockPoolError(f"blocks already in the pool (or repeated): {known or ids}")
        self._retired.difference_update(ids)
        self._shelve(ids)

    def claim(self, ids: Iterable[int]) -> None:
        """These blocks are allocated from now on: free ones leave the free list, unknown
        ones join the pool (a lease that arrived holding a request's KV)."""
        ids = list(ids)
        bad = [i for i in ids if i in self._allocated]
        if bad or len(set(ids)) != len(ids):
            raise BlockPoolError(f"claim of blocks already allocated (or repeated): {bad or ids}")
        free = [i for i in ids if i in self._free_set]
        if free:
            self._free_set.difference_update(free)
            gone = set(free)
            self._free = deque(b for b in self._free if b not in gone)
        self._retired.difference_update(ids)
        self._allocated.update(ids)

    def take_free(self, n: int) -> list[int]:
        """Remove up to n free blocks from the pool (to give them back); the newest freed
        stay, so recently used KV is not the first to go."""
        ids = [self._free.popleft() for _ in range(min(n, len(self._free)))]
        self._free_set.difference_update(ids)
        return ids

    def disown(self, ids: Iterable[int]) -> None:
        """Allocated blocks leave the pool without being freed (the daemon's index owns them)."""
        ids = list(ids)
        bad = [i for i in ids if i not in self._allocated]
        if bad:
            raise BlockPoolError(f"disown of blocks that are not allocated: {bad}")
        self._allocated.difference_update(ids)

    def retire(self, keep: Iterable[int]) -> list[int]:
        """From now on only ids in `keep` are handed out (a later call replaces `keep`;
        what already left stays out). Free ids outside it leave now (returned);
        allocated ones leave when freed."""
        self._keep = frozenset(keep)
        gone = [b for b in self._free if b not in self._keep]
        if gone:
            out = set(gone)
            self._free = deque(b for b in self._free if b not in out)
            self._free_set.difference_update(out)
            self._retired.update(out)
        return gone

    @property
    def keep(self) -> frozenset[int] | None:
        """The ids the pool is narrowed to (None: no retire)."""
        return self._keep

    def retired(self) -> frozenset[int]:
        """Ids that left the pool by a retire (never free or allocated here again, unless
        claimed back)."""
        return frozenset(self._retired)

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free_set

    def is_allocated(self, block_id: int) -> bool:
        return block_id in self._allocated

    def free_ids(self) -> frozenset[int]:
        return frozenset(self._free_set)

    def allocated(self) -> frozenset[int]:
        return frozenset(self._allocated)
