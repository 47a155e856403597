"""The engine's free list of KV block ids.

Invariant: every block id the pool holds is either free or allocated, never both; `free`
of an id that is not allocated is an error (double free), so a leak or a double free is
caught where it happens, not later as corrupted KV.

The pool's membership can change: a standalone engine owns every block of its KV cache
(`BlockPool(num_blocks)`), while a worker leases blocks from its MemPool daemon (`add`),
gives unused ones back (`take_free`) and hands finished requests' blocks to the daemon's
index (`disown`).
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
        self._free.extend(ids)
        self._free_set.update(ids)

    def add(self, ids: Iterable[int]) -> None:
        """New free blocks (leased from the MemPool daemon)."""
        ids = list(ids)
        known = [i for i in ids if i in self._free_set or i in self._allocated]
        if known or len(set(ids)) != len(ids):
            raise BlockPoolError(f"blocks already in the pool (or repeated): {known or ids}")
        self._free.extend(ids)
        self._free_set.update(ids)

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
            self._free = deque(b for b in self._free if b not in set(free))
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

    def is_free(self, block_id: int) -> bool:
        return block_id in self._free_set

    def is_allocated(self, block_id: int) -> bool:
        return block_id in self._allocated

    def allocated(self) -> frozenset[int]:
        return frozenset(self._allocated)
