"""The group's block tables, and the live KV exchange of the requests that were running
when the group formed (pure).

At the commit every member holds two kinds of sub-blocks: *stale* ones, the KV of its own
running requests (full block b of a request homed at member h is sub-blocks b*g..b*g+g-1
at h, sub-block b*g + j holding the layers of rank j), and free ones it leased. The leader
builds one table per member (`tables[m][k]` = member m's sub-block of group block k):

- a stale block b of a request homed at h becomes group block k with `tables[h][k] =
  b*g + h` (h's own layers stay in place, no copy) and, on every other member j, a fresh
  sub-block `tables[j][k]`: the destination of the copy (h, b*g + j) -> (j, tables[j][k]);
- each such source (h, b*g + j) is group block k' too, *reserved* until its copy is done
  (it holds data to send), then a free group block like any other;
- the free sub-blocks pair up into the remaining group blocks, highest ids first (group
  KV fills the lent memory first: see `homes.py`).

A request whose blocks do not all find fresh destinations is not exchanged: its KV is
dropped and it is recomputed (same tokens). Invariant: within a member's table every
sub-block appears once; destinations are never stale; every stale sub-block is in the
table (in place or as a reserved source).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StaleRequest:
    request_id: str
    home: int  # member rank whose KV holds it
    blocks: tuple[int, ...]  # full-block ids at home


@dataclass
class Move:
    """One stale request's exchange: its group blocks, and the copies that fill them."""

    request_id: str
    home: int
    group_blocks: list[int]  # the request's blocks in the group, in order
    copies: list[tuple[int, int, int, int]]  # (src member, src sub, dst member, dst sub)
    reserved: list[int]  # group ids of the sources, free once the copies are done

    @property
    def num_copies(self) -> int:
        return len(self.copies)


@dataclass
class GroupTables:
    tables: list[list[int]]  # per member: group id -> its sub-block
    moves: list[Move] = field(default_factory=list)
    recompute: list[str] = field(default_factory=list)  # stale requests not exchanged

    @property
    def num_blocks(self) -> int:
        return len(self.tables[0]) if self.tables else 0

    def held(self) -> set[int]:
        """Group ids that start allocated: the exchanged requests' blocks and the sources."""
        return {k for m in self.moves for k in (*m.group_blocks, *m.reserved)}


def build_tables(
    held: Sequence[Sequence[int]], stale: Sequence[StaleRequest], g: int
) -> GroupTables:
    """`held[m]`: every sub-block member m holds (stale and free); `stale`: the requests
    running on the members at the commit, with their full blocks at home."""
    if len(held) != g or g < 2:
        raise ValueError("one list of held sub-blocks per member, at least two members")
    sets = [set(h) for h in held]
    stale_subs: list[set[int]] = [set() for _ in range(g)]
    for r in stale:
        for b in r.blocks:
            subs = {b * g + j for j in range(g)}
            if not subs <= sets[r.home]:
                raise ValueError(f"{r.request_id}: block {b} is not held by member {r.home}")
            stale_subs[r.home] |= subs
    # Fresh sub-blocks per member, highest first (popped from the end of an ascending list).
    free = [sorted(sets[m] - stale_subs[m]) for m in range(g)]
    tables: list[list[int]] = [[] for _ in range(g)]
    moves: list[Move] = []
    recompute: list[str] = []

    def new_block(fixed: dict[int, int]) -> int:
        """A group block with `fixed` sub-blocks (member -> sub) and fresh ones elsewhere."""
        k = len(tables[0])
        for m in range(g):
            tables[m].append(fixed[m] if m in fixed else free[m].pop())
        return k

    for r in stale:
        # Per block, every other member gives one fresh sub-block to the block itself and
        # one to each of its g-1 sources (reserved group blocks): g in all; home gives none.
        need = [0 if j == r.home else len(r.blocks) * g for j in range(g)]
        if any(len(free[j]) < need[j] for j in range(g)):
            recompute.append(r.request_id)
            continue
        group_blocks: list[int] = []
        copies: list[tuple[int, int, int, int]] = []
        reserved: list[int] = []
        for b in r.blocks:
            k = new_block({r.home: b * g + r.home})
            group_blocks.append(k)
            for j in range(g):
                if j == r.home:
                    continue
                copies.append((r.home, b * g + j, j, tables[j][k]))
                reserved.append(new_block({r.home: b * g + j}))
        moves.append(Move(r.request_id, r.home, group_blocks, copies, reserved))
    # Stale sub-blocks of requests that are recomputed are free again.
    exchanged = {m.request_id for m in moves}
    for r in stale:
        if r.request_id not in exchanged:
            for b in r.blocks:
                free[r.home].extend(b * g + j for j in range(g))
            free[r.home].sort()
    while all(free):
        new_block({})
    return GroupTables(tables, moves, recompute)


def permute(plan: GroupTables, order: Sequence[int]) -> GroupTables:
    """The same tables with group ids renumbered: new id i is old id `order[i]`."""
    new_of = {old: new for new, old in enumerate(order)}
    return GroupTables(
        [[t[old] for old in order] for t in plan.tables],
        [
            Move(
                m.request_id,
                m.home,
                [new_of[k] for k in m.group_blocks],
                m.copies,
                [new_of[k] for k in m.reserved],
            )
            for m in plan.moves
        ],
        plan.recompute,
    )
