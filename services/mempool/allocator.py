"""Free list of one tier's block ids.

Every id in [0, capacity) is in exactly one state, and `check_integrity` proves it:

    free      in the free list, below the ceiling; handed out by `allocate`
    used      handed out; `free` of an id that is not used is refused (double free)
    retired   free but at or above the ceiling of a pending `shrink`: never handed out

The capacity may grow up to `max_blocks` (the region's reservation). `shrink(target)` lowers
the ceiling: ids >= target are never handed out again, used ones retire as they are freed,
and once all of [target, capacity) is retired the capacity drops to target.

Split mode (KunServe layer dropping): `split(g)` reinterprets each block of L layers as g
sub-blocks of L/g layers in place, block b -> sub-blocks b*g .. b*g+g-1 (no copy; mirrors
`services/worker/kv_cache.py:split_blocks`). Each sub-block takes its block's state, and
capacity, ceiling and `max_blocks` scale by g. `merge()` undoes it when every aligned run of
g sub-blocks is in one state (and, for used runs, one owner as the caller sees it).
Invariant in split mode: `max_blocks % split == 0`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterable


class AllocatorError(ValueError):
    """A refused call; the allocator is unchanged."""


class BlockAllocator:
    def __init__(self, capacity: int, max_blocks: int | None = None):
        self.max_blocks = capacity if max_blocks is None else max_blocks
        if not 0 <= capacity <= self.max_blocks:
            raise ValueError(f"capacity {capacity} outside [0, {self.max_blocks}]")
        self.capacity = capacity
        self.ceiling = capacity  # ids >= ceiling are never handed out (< capacity: shrinking)
        self.split_factor = 1  # sub-blocks per whole block; 1 = whole blocks
        self._free: deque[int] = deque(range(capacity))
        self._free_set = set(self._free)
        self._retired: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - len(self._free) - len(self._retired)

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
        bad = [b for b in ids if not self.is_valid(b) or b in self._free_set or b in self._retired]
        if bad or len(set(ids)) != len(ids):
            raise AllocatorError(f"free of blocks that are not in use: {bad or ids}")
        for b in ids:
            if b < self.ceiling:
                self._free.append(b)
                self._free_set.add(b)
            else:
                self._retired.add(b)
        self._finish_shrink()

    def grow(self, capacity: int) -> None:
        """Raise the ceiling to `capacity` (cancelling a pending shrink below it)."""
        if not self.ceiling <= capacity <= self.max_blocks:
            raise AllocatorError(
                f"can grow from {self.ceiling} to at most {self.max_blocks}, not {capacity}"
            )
        back = sorted(b for b in self._retired if b < capacity)
        self._retired.difference_update(back)
        new = [*back, *range(self.capacity, capacity)]
        self._free.extend(new)
        self._free_set.update(new)
        self.ceiling = capacity
        self.capacity = max(self.capacity, capacity)
        self._finish_shrink()

    def free_ids(self) -> frozenset[int]:
        return frozenset(self._free_set)

    def retired_ids(self) -> frozenset[int]:
        return frozenset(self._retired)

    def used_ids(self) -> frozenset[int]:
        return frozenset(range(self.capacity)) - self._free_set - self._retired

    # ------------------------------------------------------------------ shrink
    def shrink(self, target: int) -> list[int]:
        """Lower the ceiling to `target`; returns the used ids at or above it (to relocate).

        Free ids above the ceiling retire at once, used ones when freed; `pending_shrink`
        is empty (and `capacity == target`) once all have."""
        if not 0 <= target <= self.ceiling:
            raise AllocatorError(f"cannot shrink to {target}: the ceiling is {self.ceiling}")
        gone = [b for b in self._free if b >= target]
        if gone:
            self._free = deque(b for b in self._free if b < target)
            self._free_set.difference_update(gone)
            self._retired.update(gone)
        self.ceiling = target
        self._finish_shrink()
        return self.pending_shrink

    @property
    def pending_shrink(self) -> list[int]:
        """Used ids at or above the ceiling, ascending; empty when no shrink is pending."""
        if self.ceiling == self.capacity:
            return []
        return [
            b
            for b in range(self.ceiling, self.capacity)
            if b not in self._retired  # retired ids are never in the free set
        ]

    def _finish_shrink(self) -> None:
        if len(self._retired) == self.capacity - self.ceiling:
            self._retired.clear()
            self.capacity = self.ceiling

    # ------------------------------------------------------------------ split mode
    def split(self, g: int) -> None:
        """Block b becomes sub-blocks b*g .. b*g+g-1, each in b's state (free list order kept)."""
        if g < 1:
            raise AllocatorError(f"cannot split blocks into {g} parts")
        if self.split_factor != 1:
            raise AllocatorError(f"already split into {self.split_factor}; merge first")
        if g == 1:
            return
        self._free = deque(b * g + j for b in self._free for j in range(g))
        self._free_set = set(self._free)
        self._retired = {b * g + j for b in self._retired for j in range(g)}
        self.capacity *= g
        self.ceiling *= g
        self.max_blocks *= g
        self.split_factor = g

    def merge(self, owner_of: Callable[[int], Hashable] | None = None) -> None:
        """Back to whole blocks: sub-blocks b*g .. b*g+g-1 become block b.

        Refused (nothing changed) unless capacity and ceiling are whole blocks and every
        aligned run of g sub-blocks is all free, all retired or all used (with one
        `owner_of` value when given)."""
        g = self.split_factor
        if g == 1:
            raise AllocatorError("cannot merge: not split")
        if self.capacity % g or self.ceiling % g:
            raise AllocatorError(
                f"cannot merge: capacity {self.capacity} / ceiling {self.ceiling} "
                f"is not a whole number of blocks of {g}"
            )
        for start in range(0, self.capacity, g):
            run = range(start, start + g)
            states = {self._state(s) for s in run}
            if len(states) != 1:
                raise AllocatorError(f"cannot merge: sub-blocks {start}..{start + g - 1} mixed")
            if owner_of is not None and states == {"used"} and len({owner_of(s) for s in run}) != 1:
                raise AllocatorError(
                    f"cannot merge: sub-blocks {start}..{start + g - 1} have several owners"
                )
        self._free = deque(s // g for s in self._free if s % g == 0)
        self._free_set = set(self._free)
        self._retired = {s // g for s in self._retired if s % g == 0}
        self.capacity //= g
        self.ceiling //= g
        self.max_blocks //= g
        self.split_factor = 1

    def allocate_aligned(self, n: int) -> list[list[int]]:
        """n runs of `split_factor` consecutive free sub-blocks, each starting at a multiple
        of it (a whole block's worth of memory); refused, nothing allocated, if too few."""
        g = self.split_factor
        if n < 0:
            raise AllocatorError(f"cannot allocate {n} aligned runs")
        starts: list[int] = []
        for s in self._free:  # free list order, like `allocate`
            if len(starts) == n:
                break
            if s % g == 0 and all(s + j in self._free_set for j in range(1, g)):
                starts.append(s)
        if len(starts) < n:
            raise AllocatorError(f"cannot allocate {n} aligned runs of {g}: {len(starts)} free")
        runs = [list(range(s, s + g)) for s in starts]
        taken = {b for run in runs for b in run}
        self._free = deque(b for b in self._free if b not in taken)
        self._free_set.difference_update(taken)
        return runs

    def _state(self, block: int) -> str:
        if block in self._free_set:
            return "free"
        return "retired" if block in self._retired else "used"

    # ------------------------------------------------------------------ integrity
    def check_integrity(self) -> None:
        """Assert the module docstring's invariants."""
        g = self.split_factor
        assert g >= 1 and self.max_blocks % g == 0, f"split {g}, max_blocks {self.max_blocks}"
        assert 0 <= self.ceiling <= self.capacity <= self.max_blocks, (
            f"ceiling {self.ceiling}, capacity {self.capacity}, max {self.max_blocks}"
        )
        assert len(self._free) == len(self._free_set) and set(self._free) == self._free_set, (
            "free list and free set differ (duplicate or stray id)"
        )
        assert all(0 <= b < self.ceiling for b in self._free_set), "free id above the ceiling"
        assert all(self.ceiling <= b < self.capacity for b in self._retired), (
            "retired id below the ceiling or beyond capacity"
        )
        if self.ceiling < self.capacity:
            assert len(self._retired) < self.capacity - self.ceiling, "finished shrink pending"
        else:
            assert not self._retired, "retired ids with no shrink pending"
