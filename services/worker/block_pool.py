"""The engine's free list of KV block ids.

Invariant: every block id in [0, num_blocks) is either in the free list or allocated,
never both; `free` of an id that is not allocated is an error (double free), so a leak or
a double free is caught where it happens, not later as corrupted KV.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class BlockPoolError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        # FIFO reuse: a freed block goes to the back, so recently freed KV survives longest.
        self._free: deque[int] = deque(range(num_blocks))
        self._allocated: set[int] = set()

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

    def is_allocated(self, block_id: int) -> bool:
        return block_id in self._allocated

    def allocated(self) -> frozenset[int]:
        return frozenset(self._allocated)
