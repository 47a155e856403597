"""Named tensors kept by a MemPool daemon (parameters, activations) in a page arena.

    tensor region: [ page 0 | page 1 | ... ]   PAGE_BYTES each; a tensor = a run of pages

The bytes live in the daemon's tensor region (shared memory), so they move between daemons
through the same transports as KV blocks: a tensor is one run of consecutive pages, one
transfer op. The arena is first-fit over free page ranges and merges neighbours on free.
Invariant (`check`): the free ranges and the tensors' ranges tile the arena exactly.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

PAGE_BYTES = 64 * 1024


class TensorStoreError(ValueError):
    pass


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    first_page: int
    num_pages: int


class PageArena:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free: list[tuple[int, int]] = (
            [(0, num_pages)] if num_pages else []
        )  # (start, count), sorted

    @property
    def free_pages(self) -> int:
        return sum(c for _, c in self._free)

    def allocate(self, count: int) -> int:
        for i, (start, n) in enumerate(self._free):
            if n >= count:
                if n == count:
                    del self._free[i]
                else:
                    self._free[i] = (start + count, n - count)
                return start
        raise TensorStoreError(f"no run of {count} free pages ({self.free_pages} free in all)")

    def free(self, start: int, count: int) -> None:
        i = bisect.bisect_left(self._free, (start, 0))
        self._free.insert(i, (start, count))
        # Merge with the right, then the left neighbour.
        if i + 1 < len(self._free) and start + count == self._free[i + 1][0]:
            self._free[i] = (start, count + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    def ranges(self) -> list[tuple[int, int]]:
        return list(self._free)


class TensorStore:
    def __init__(self, num_pages: int):
        self.arena = PageArena(num_pages)
        self.tensors: dict[str, TensorEntry] = {}

    @staticmethod
    def pages_for(nbytes: int) -> int:
        return max(1, -(-nbytes // PAGE_BYTES))

    def reserve(self, nbytes: int) -> int:
        """Pages for a tensor about to arrive; `commit` names it, `release` gives them back."""
        return self.arena.allocate(self.pages_for(nbytes))

    def commit(
        self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int, first_page: int
    ) -> TensorEntry:
        old = self.tensors.pop(name, None)
        if old is not None:  # replacing a tensor frees the old bytes
            self.arena.free(old.first_page, old.num_pages)
        entry = TensorEntry(name, dtype, shape, nbytes, first_page, self.pages_for(nbytes))
        self.tensors[name] = entry
        return entry

    def release(self, first_page: int, nbytes: int) -> None:
        self.arena.free(first_page, self.pages_for(nbytes))

    def get(self, name: str) -> TensorEntry:
        entry = self.tensors.get(name)
        if entry is None:
            raise TensorStoreError(f"no tensor named {name!r}")
        return entry

    def delete(self, name: str) -> None:
        entry = self.get(name)
        del self.tensors[name]
        self.arena.free(entry.first_page, entry.num_pages)

    def check(self, reserved: Sequence[tuple[int, int]] = ()) -> None:
        """Assert free ranges, tensors and in-flight `reserved` (start, count) tile the arena."""
        spans = sorted(
            self.arena.ranges()
            + [(e.first_page, e.num_pages) for e in self.tensors.values()]
            + list(reserved)
        )
        pos = 0
        for start, count in spans:
            assert start == pos, (
                f"tensor arena: gap or overlap at page {pos} (next span starts at {start})"
            )
            pos += count
        assert pos == self.arena.num_pages, (
            f"tensor arena covers {pos} of {self.arena.num_pages} pages"
        )
