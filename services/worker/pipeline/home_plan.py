"""Where a live restore makes room at its home (pure).

The home of a live restore is one follower h (rank 1). Before it can take its full
parameters back, no group block may use its sub-blocks at or above its pre-drop capacity
(`capacity * g`: that memory goes back to the parameters); and the requests it takes home
need whole blocks `e` (sub-blocks `e*g .. e*g+g-1`) that no group block uses. So its
sub-blocks below the ceiling are cut in two: whole blocks `[0, home_blocks)` for the
requests at home, and the tail `[home_blocks*g, capacity*g)` for the group, which from
then on may only use the group blocks k whose sub-block at h lies in the tail (`keep`).

The cut moves up as requests go home: each batch frees its group blocks in the tail, a
new plan with the group's smaller need gives the home more whole blocks (the group
blocks below the new cut move up first).

Invariants of a plan: every k in `keep` maps into the tail; `len(keep) >= need` (the
group's live blocks and what they may grow by fit there) and `home_blocks >= min_home`
(the next batch fits at home). None when no cut satisfies both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class HomePlan:
    home_blocks: int  # whole blocks [0, home_blocks) at the home serve its requests
    keep: frozenset[int]  # group blocks the group may still use


def plan_home(
    table: Sequence[int], capacity: int, g: int, need: int, min_home: int
) -> HomePlan | None:
    """`table[k]`: the home's sub-block of group block k; `capacity`: its whole blocks
    before the drop; `need`: group blocks live now plus room to grow; `min_home`: whole
    blocks the home needs. The largest home region whose tail still holds `need` group
    blocks."""
    if g < 2 or capacity <= 0 or need < 0 or min_home < 0:
        raise ValueError(
            f"bad home plan input: g={g}, capacity={capacity}, need={need}, min_home={min_home}"
        )
    ceiling = capacity * g
    below = sorted(s for s in table if s < ceiling)
    # With home_blocks = e, the tail holds the sub-blocks >= e*g; try the largest e first.
    for e in range(capacity, -1, -1):
        start = e * g
        in_tail = sum(1 for s in below if s >= start)
        if in_tail >= need:
            if e < min_home:
                return None  # a smaller home region only has less room for the requests
            keep = frozenset(k for k, s in enumerate(table) if start <= s < ceiling)
            return HomePlan(e, keep)
    return None
