"""Which client owns each block of one tier: the 'client' state of the pool's diagram.

    block id:   0  1  2  3  4  5 ...          (array of max_blocks int32)
    owner code: 0  2  2  0  1  0 ...          0: not a client block
    names:      1 -> "worker-a", 2 -> "transfer:7"

One owner code per block id, so a prompt's worth of blocks is checked, given and taken
in a few numpy steps instead of one dict operation per block (the insert path hands the
index thousands of blocks at once). The dict-like methods serve the one-block paths.

Invariants (`check`): `len(self)` is the number of non-zero codes, and every non-zero code
names an owner. Codes of owners with no block left are reclaimed in bulk when the table of
names has grown well past the live ones (owner names such as `transfer:<id>` never repeat).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

_RECLAIM_AT = 1024  # names in the table before dead ones are looked for


class ClientBlocks:
    def __init__(self, max_blocks: int):
        self._code = np.zeros(max_blocks, dtype=np.int32)
        self._scratch = np.zeros(max_blocks, dtype=np.intp)
        self._names: list[str | None] = [None]  # code -> owner; None: code 0, or spare
        self._codes: dict[str, int] = {}
        self._spare: list[int] = []
        self._reclaim_at = _RECLAIM_AT
        self._count = 0

    # ------------------------------------------------------------ one block
    def __contains__(self, block: object) -> bool:
        if not isinstance(block, (int, np.integer)) or not 0 <= block < len(self._code):
            return False
        return bool(self._code[block])

    def get(self, block: int) -> str | None:
        code = int(self._code[block]) if 0 <= block < len(self._code) else 0
        return self._names[code]

    def __getitem__(self, block: int) -> str:
        name = self.get(block)
        if name is None:
            raise KeyError(block)
        return name

    def __setitem__(self, block: int, owner: str) -> None:
        self.give([block], owner)

    def __delitem__(self, block: int) -> None:
        self.take([block])

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[int]:
        return iter(np.flatnonzero(self._code).tolist())

    def items(self) -> list[tuple[int, str]]:
        ids = np.flatnonzero(self._code)
        names = self._names
        return [
            (b, names[c] or "") for b, c in zip(ids.tolist(), self._code[ids].tolist(), strict=True)
        ]

    # ------------------------------------------------------------ many blocks
    def index(self, ids: Sequence[int]) -> np.ndarray | None:
        """`ids` as an index array, or None when one is not a block id of this tier."""
        try:
            idx = np.fromiter(ids, dtype=np.intp, count=len(ids))
        except (OverflowError, TypeError, ValueError):
            return None
        # One bound check: viewed unsigned, a negative id is larger than any block id.
        if len(idx) and idx.view(np.uintp).max() >= len(self._code):
            return None
        return idx

    def held(self, ids: Sequence[int]) -> list[bool]:
        """For each of `ids`: is it a client block (an id out of range is not)."""
        idx = self.index(ids)
        if idx is None:
            return [b in self for b in ids]
        return self._code[idx].astype(bool).tolist()

    def owners(self, ids: Sequence[int]) -> list[str]:
        """The owner of each of `ids` (all client blocks)."""
        names = self._names
        return [names[c] or "" for c in self._code[np.asarray(ids, dtype=np.intp)].tolist()]

    def owns_all(self, idx: np.ndarray) -> bool:
        return bool(self._code[idx].all())

    def has_repeats(self, idx: np.ndarray) -> bool:
        positions = np.arange(len(idx), dtype=np.intp)
        self._scratch[idx] = positions  # a repeated id keeps only its last position
        return bool((self._scratch[idx] != positions).any())

    def give(self, ids: Sequence[int] | np.ndarray, owner: str) -> None:
        """Make `ids` (valid, no repeats) client blocks of `owner`, whoever held them."""
        if not len(ids):
            return
        idx = np.asarray(ids, dtype=np.intp)
        self._count += len(idx) - int(np.count_nonzero(self._code[idx]))
        self._code[idx] = self._code_of(owner)

    def take(self, ids: Sequence[int] | np.ndarray) -> None:
        """Drop `ids` (client blocks, no repeats: the caller checked) from their owners."""
        if not len(ids):
            return
        self._code[np.asarray(ids, dtype=np.intp)] = 0
        self._count -= len(ids)

    # ------------------------------------------------------------ split mode
    def split(self, g: int) -> None:
        """Block b becomes sub-blocks b*g .. b*g+g-1, each owned as b was (see allocator)."""
        self._code = np.repeat(self._code, g)
        self._scratch = np.zeros(len(self._code), dtype=np.intp)
        self._count *= g

    def merge(self, g: int) -> None:
        """Undo `split(g)`; the caller checked every aligned run of g has one owner."""
        runs = self._code.reshape(-1, g)
        assert (runs == runs[:, :1]).all(), "merge of sub-blocks with several owners"
        self._code = runs[:, 0].copy()
        self._scratch = np.zeros(len(self._code), dtype=np.intp)
        self._count //= g

    def _code_of(self, owner: str) -> int:
        code = self._codes.get(owner)
        if code is not None:
            return code
        if not self._spare and len(self._names) >= self._reclaim_at:
            self._reclaim()
        if self._spare:
            code = self._spare.pop()
            self._names[code] = owner
        else:
            code = len(self._names)
            self._names.append(owner)
        self._codes[owner] = code
        return code

    def _reclaim(self) -> None:
        """Free the codes no block holds (one pass over the array, every ~1,000 new names)."""
        live = set(np.unique(self._code).tolist())
        for code in range(1, len(self._names)):
            name = self._names[code]
            if name is not None and code not in live:
                del self._codes[name]
                self._names[code] = None
                self._spare.append(code)
        self._reclaim_at = max(_RECLAIM_AT, 2 * (len(self._names) - len(self._spare)))

    def check(self) -> None:
        codes = self._code[self._code != 0]
        assert len(codes) == self._count, f"{len(codes)} client blocks, counted {self._count}"
        for code in set(codes.tolist()):
            name = self._names[code]
            assert name is not None and self._codes[name] == code, f"owner code {code}"
