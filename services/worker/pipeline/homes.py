"""Where each group request goes at a restore, and which sub-blocks move (pure).

A group request's KV is spread over the members: group block k is sub-block
`tables[j][k]` on member j, holding member j's layers. Back home on member h it needs
whole blocks again: full block e at h is sub-blocks `e*g .. e*g+g-1`, sub-block `e*g + j`
holding member j's layers (the split mapping). So moving request r home to h with full
blocks e_1..e_n is, for every member j and i: copy (j, tables[j][k_i]) -> (h, e_i*g + j),
a local copy when j == h, a MemPool transfer otherwise.

Constraints: after the restore a member's KV capacity is `capacity[h]` full blocks again
(the parameters take the rest back), so e < capacity[h]; and an e-block may only cover
sub-blocks that hold no KV still to be moved. The plan runs in rounds: a round moves
every request that fits now; its sources are free for the next round's destinations (the
rounds' copies run in order). Requests that never fit go home without KV and are
recomputed there (same tokens; only time is lost).

Homes balance the tokens each member takes back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Copy:
    src_member: int
    src: int  # sub-block id on src_member
    dst_member: int
    dst: int  # sub-block id on dst_member


@dataclass
class Home:
    request_id: str
    member: int
    blocks: list[int] = field(default_factory=list)  # full blocks at `member`; [] = recompute


@dataclass
class RestorePlan:
    homes: dict[str, Home]
    rounds: list[list[Copy]]

    def keep(self, member: int) -> list[int]:
        """Full blocks `member` keeps for the requests it takes back."""
        return sorted(b for h in self.homes.values() if h.member == member for b in h.blocks)

    @property
    def moved(self) -> int:
        return sum(1 for h in self.homes.values() if h.blocks)

    @property
    def recomputed(self) -> int:
        return sum(1 for h in self.homes.values() if not h.blocks)


def plan_restore(
    requests: Sequence[tuple[str, Sequence[int], int]],
    tables: Sequence[Sequence[int]],
    capacity: Sequence[int],
) -> RestorePlan:
    """`requests`: (request id, its group blocks, its tokens); `tables[j][k]`: member j's
    sub-block of group block k; `capacity[j]`: member j's full blocks after the restore."""
    g = len(tables)
    if len(capacity) != g or g < 2:
        raise ValueError("one table and one capacity per member, at least two members")
    used = [{tables[j][k] for _, blocks, _ in requests for k in blocks} for j in range(g)]
    taken: list[set[int]] = [set() for _ in range(g)]
    load = [0] * g
    homes: dict[str, Home] = {}
    rounds: list[list[Copy]] = []
    pending = sorted(requests, key=lambda r: (-len(r[1]), r[0]))  # big first: they fit worst
    while pending:
        ops: list[Copy] = []
        moved = []
        for rid, blocks, tokens in pending:
            n = len(blocks)
            for h in sorted(range(g), key=lambda m: (load[m], m)):
                free = _free_blocks(h, g, capacity[h], used[h], taken[h], n)
                if free is not None:
                    break
            else:
                continue
            taken[h].update(free)
            load[h] += tokens
            homes[rid] = Home(rid, h, free)
            ops.extend(
                Copy(j, tables[j][k], h, e * g + j)
                for j in range(g)
                for k, e in zip(blocks, free, strict=True)
            )
            moved.append((rid, blocks, tokens))
        if not moved:
            break
        for _, blocks, _ in moved:
            for j in range(g):
                used[j].difference_update(tables[j][k] for k in blocks)
        rounds.append(ops)
        pending = [r for r in pending if r[0] not in homes]
    for rid, _, tokens in pending:  # no room with KV: home without it, recomputed there
        h = min(range(g), key=lambda m: (load[m], m))
        load[h] += tokens
        homes[rid] = Home(rid, h)
    return RestorePlan(homes, rounds)


def _free_blocks(
    member: int, g: int, capacity: int, used: set[int], taken: set[int], n: int
) -> list[int] | None:
    out: list[int] = []
    if n == 0:
        return out
    for e in range(capacity):
        if e in taken or any(e * g + j in used for j in range(g)):
            continue
        out.append(e)
        if len(out) == n:
            return out
    return None
