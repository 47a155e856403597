"""Free list of one tier's block ids.

Invariant: ids in [0, capacity) are each either free (in the list) or used, never both;
`free` of an id that is not used is refused, so a double free surfaces at the call. The
capacity may grow (the region reserves `max_blocks`); it never shrinks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class AllocatorError(ValueError):
    pass


class BlockAllocator:
    def __init__(self, capacity: int, max_blocks: int | None = None):
        self.max_blocks = capacity if max_blocks is None else max_blocks
        if not 0 <= capacity <= self.max_blocks:
            raise ValueError(f"capacity {capacity} outside [0, {self.max_blocks}]")
        self.capacity = capacity
        self._free: deque[int] = deque(range(capacity))
        self._free_set = set(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free)

    def is_free(self, block: int) -> bool:
        return block in self._free_set

    def is_valid(self, block: int) -> bool:
        return 0 <= block < self.capacity

    def allocate(self, n: int) -> list[int]:
        if n < 0 or n > len(self._free):
            raise AllocatorError(f"cannot allocate {n} blocks: {len(self._free)} free")
        ids = [self._free.popleft() for _ in range(n)]
        self._free_set.difference_update(ids)
        return ids

    def free(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        bad = [b for b in ids if not self.is_valid(b) or b in self._free_set]
        if bad or len(set(ids)) != len(ids):
            raise AllocatorError(f"free of blocks that are not in use: {bad or ids}")
        self._free.extend(ids)
        self._free_set.update(ids)

    def grow(self, capacity: int) -> None:
        if not self.capacity <= capacity <= self.max_blocks:
            raise AllocatorError(
                f"can grow from {self.capacity} to at most {self.max_blocks}, not {capacity}"
            )
        new = range(self.capacity, capacity)
        self._free.extend(new)
        self._free_set.update(new)
        self.capacity = capacity

    def free_ids(self) -> frozenset[int]:
        return frozenset(self._free_set)
