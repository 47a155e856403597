"""Moving a group's KV home at a restore (the plan is `homes.plan_restore`'s), and the
lease of a member's whole KV at a drop.

A round's copies go per (source, destination) member pair: a local copy when both are the
leader (it maps its own KV), a follower's own local copy through its control socket
(`CopyLocal`), or one MemPool transfer from the source's daemon into sub-blocks the
destination worker holds (both daemons are split alike, so a sub-block is one block
there). Pairs of a round run at once; rounds run in order (a round's sources are the next
round's free room).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence

import msgspec

from common.errors import ErrorKind
from common.mempool_client import MempoolClient
from common.protocol import elastic as el
from common.sockets import RpcError
from services.worker.kv_cache import KVCache
from services.worker.pipeline.homes import RestorePlan
from services.worker.pipeline.views import copy_sub_blocks

# A follower's local copies: (rank, [(src, dst), ...]) -> done.
CopyAt = Callable[[int, list[tuple[int, int]]], Awaitable[None]]


async def move_home(
    plan: RestorePlan, members: Sequence[el.Member], leader_kv: KVCache, copy_at: CopyAt
) -> int:
    """Run every round of `plan`; returns the bytes moved (copied or transferred)."""
    sub_bytes = leader_kv.layout.bytes_per_block
    moved = 0
    for ops in plan.rounds:
        work = [
            _pair(src, dst, copies, members, leader_kv, copy_at, sub_bytes)
            for (src, dst), copies in by_pair(
                (c.src_member, c.src, c.dst_member, c.dst) for c in ops
            ).items()
        ]
        moved += sum(await asyncio.gather(*work))
    return moved


def homes_of(
    states: Sequence[el.RequestState], plan: RestorePlan
) -> dict[int, list[el.RequestState]]:
    """Each member's requests with the whole blocks their KV now fills there (none, and
    nothing computed, for one that goes home to be recomputed)."""
    out: dict[int, list[el.RequestState]] = defaultdict(list)
    for s in states:
        home = plan.homes[s.request_id]
        out[home.member].append(
            msgspec.structs.replace(
                s,
                block_ids=home.blocks,
                num_computed_tokens=s.num_computed_tokens if home.blocks else 0,
            )
        )
    return out


def by_pair(
    copies: Iterable[tuple[int, int, int, int]],
) -> dict[tuple[int, int], list[tuple[int, int]]]:
    """(src member, src sub, dst member, dst sub) copies grouped by member pair: each
    pair's copies are one transfer."""
    pairs: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    for src_m, src, dst_m, dst in copies:
        pairs[(src_m, dst_m)].append((src, dst))
    return pairs


async def transfer(
    members: Sequence[el.Member],
    src: int,
    dst: int,
    copies: list[tuple[int, int]],
    timeout_s: float = 30.0,
) -> int:
    """One MemPool transfer of sub-blocks from member `src`'s daemon into sub-blocks member
    `dst` holds at its daemon (both split alike); returns the bytes moved."""
    client = MempoolClient(members[src].mempool)
    try:
        done = await client.transfer(
            members[dst].mempool,
            [s for s, _ in copies],
            [d for _, d in copies],
            timeout_s=timeout_s,
        )
    finally:
        client.close()
    return done.nbytes


async def _pair(
    src: int,
    dst: int,
    copies: list[tuple[int, int]],
    members: Sequence[el.Member],
    leader_kv: KVCache,
    copy_at: CopyAt,
    sub_bytes: int,
) -> int:
    if src == dst == 0:
        copy_sub_blocks(leader_kv, copies)
        return len(copies) * sub_bytes
    if src == dst:
        await copy_at(src, copies)
        return len(copies) * sub_bytes
    return await transfer(members, src, dst, copies)


async def lease_all(client: MempoolClient, owner: str, capacity: int) -> list[int]:
    """Every block the daemon can give, up to `capacity` (halving the ask when some are
    held elsewhere)."""
    ids: list[int] = []
    n = capacity
    while n > 0 and len(ids) < capacity:
        n = min(n, capacity - len(ids))
        try:
            ids.extend(await client.alloc_mem(n, owner=owner))
        except RpcError as exc:
            if exc.kind != ErrorKind.OUT_OF_MEMORY:
                raise
            n //= 2
    return ids
