"""A live restore (KunServe): the group keeps serving while its requests go home in
batches; the leader drives it (the member side is in elastic.py).

    room      the leader plans the home's cut (`plan_home`: rank 1's whole blocks
              [0, home_blocks) for requests at home, the tail below its pre-drop
              capacity for the group) and retires every other group block; live ones
              move into the tail by copies riding the ring (`PipelineEngine.retire`):
              nobody waits. As batches leave, the group needs less: the cut moves up the
              same way when the home runs short (HomeOpen again, a larger region).
    params    HomeOpen: the home gives back its sub-blocks above the ceiling, shrinks,
              reloads its dropped layers from local disk beside the stage it keeps
              serving, and runs a solo engine on whole blocks [0, home_blocks).
    batches   up to `batch` requests leave the pipeline once no batch of theirs is in
              flight (`park`); HomeTake reserves whole blocks at the home and copies its
              own sub-blocks; the other members' sub-blocks follow as MemPool transfers;
              HomeAdopt: the home streams them on. The rest keep decoding meanwhile.
    end       the group holds nothing more: the pause restore runs for what is left
              (requests that arrived at the very end, or everything once a step above
              failed or the deadline passed: same tokens, a pause instead), the home
              keeps its requests and merges its daemon under them.

Invariant: a request is in exactly one engine or in one batch on its way (parked at the
leader, its group blocks reserved there, until the home adopted it); a batch that fails
on the way returns to the pipeline with its group blocks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

import msgspec

from common.logging import get_logger
from common.protocol import elastic as el
from services.worker.pipeline.engine import PipelineEngine
from services.worker.pipeline.home_plan import HomePlan, plan_home
from services.worker.pipeline.moves import by_pair, transfer


class Leader(Protocol):
    """What the live restore needs of the leader's `ElasticMember` (elastic.py)."""

    svc: Any  # its MemberHost: engine, routes, aborted, adopt/announce/fail_moved/...
    group_id: str
    epoch: int
    members: list[el.Member]
    followers: list[el.FollowerCommitted]
    tables: list[list[int]]  # each member's sub-block of every group block, by rank
    moved: dict[str, str]  # request id -> request address of the member it went home to

    @property
    def g(self) -> int: ...

    async def ask(self, member: el.Member, msg: el.ElasticRequest) -> el.ElasticReply: ...


log = get_logger(__name__)

T = TypeVar("T")

HOME = 1  # the rank whose daemon takes the requests home
BATCH = 8  # requests per batch (KunServe's restore_batch_size)
_POLL_S = 0.005
_MARGIN = 4  # whole blocks the home's own requests may take between two batches


class LiveRestoreFailed(RuntimeError):
    """The live part cannot go on (no room, a refusal, the deadline); the pause restore
    takes what is left."""


class NoRoom(LiveRestoreFailed):
    """No cut of the home's memory holds both the group's KV and the next batch."""


@dataclass
class LiveStats:
    moved: int = 0
    batches: int = 0
    moved_bytes: int = 0
    stall_max_s: float = 0.0
    fallback: str = ""
    home_requests: list[tuple[str, int]] = field(default_factory=list)  # (id, tokens) home


class LiveRestore:
    def __init__(self, member: Leader, pipeline: PipelineEngine, deadline: float):
        self.m = member
        self.svc = member.svc
        self.pipeline = pipeline
        self.deadline = deadline  # monotonic
        self.stats = LiveStats()
        self.home_blocks = 0  # the home's region, whole blocks [0, home_blocks)
        self.home_free = 0  # of it, free after the last batch (the home said)
        self.opened = False  # the home runs its solo engine (the pause restore must know)
        # Parked and handed over, never adopted at the home: the pause restore takes them
        # (their group blocks stay reserved in the pipeline until then).
        self.leftover: list[el.RequestState] = []

    async def run(self) -> LiveStats:
        """Every request that can goes home live; raises nothing (the reason the rest
        needs a pause is in `stats.fallback`)."""
        try:
            if self.svc.engine.arena is not None:
                raise LiveRestoreFailed("a live restore runs on CPU members only")
            limit = BATCH
            while True:
                self._check_deadline("the requests to go home")
                ids, size = await self._between(partial(self._pick, limit))
                if not ids:
                    break
                if size > self.home_free:  # (and first of all) the cut moves up
                    try:
                        await self._grow(size - self.home_free)
                    except NoRoom:
                        if limit == 1:
                            raise
                        limit //= 2  # tight: smaller batches need less room at once
                        continue
                await self._batch(ids)
        except LiveRestoreFailed as exc:
            self.stats.fallback = str(exc)
        except Exception as exc:  # a refusal or a dead peer: the pause restore decides
            self.stats.fallback = f"{type(exc).__name__}: {exc}"
        if self.stats.fallback:
            log.warning("live restore: the rest goes home in a pause", why=self.stats.fallback)
        return self.stats

    # ------------------------------------------------------------- steps
    async def _grow(self, more: int) -> None:
        """At least `more` whole blocks more for the home: a new cut with the group's
        need now, the group blocks below it moved up, then the home told."""
        plan = await self._between(partial(self._replan, self.home_blocks + more))
        if plan is None:
            raise NoRoom("the group's KV does not fit beside the home's next batch")
        await self._until(lambda: self.pipeline.outside_live() == 0, "room at the home")
        # The last relocation copies (and a write of an aborted request into a block that
        # left) may still be on their way round the ring: wait until they have landed.
        await self._settle("the relocation copies")
        home = self.m.members[HOME]
        first = not self.opened
        self.opened = True  # from the first HomeOpen on (a lost reply included)
        await self.m.ask(home, self._msg(el.HomeOpen, home_blocks=plan.home_blocks))
        if first:
            log.info("live restore: the home serves", home=home.instance_id)
        self.home_free += plan.home_blocks - self.home_blocks
        self.home_blocks = plan.home_blocks

    def _replan(self, min_home: int) -> HomePlan | None:
        p = self.pipeline
        m = self.m
        live = p.pool.num_allocated  # reserved blocks included
        need = live + len(p.requests) + _MARGIN  # each may grow by a block meanwhile
        capacity = m.followers[HOME - 1].capacity_blocks
        plan = plan_home(m.tables[HOME][: len(p.table)], capacity, m.g, need, min_home)
        if plan is not None:
            p.retire(set(plan.keep))
        return plan

    def _pick(self, limit: int) -> tuple[list[str], int]:
        """The next batch of at most `limit` (running requests first: their KV moves,
        then waiting ones) and the whole blocks it needs at the home, with room for each
        to grow by one."""
        sched = self.pipeline.scheduler
        reqs = (list(sched.running) + list(sched.waiting))[:limit]
        size = sum(len(r.block_ids) + 1 for r in reqs) + _MARGIN
        return [r.request_id for r in reqs], size

    async def _batch(self, ids: list[str]) -> None:
        p = self.pipeline
        await self._between(lambda: p.park(ids))
        t0 = time.monotonic()
        parked: list[el.RequestState] = []
        waiting = set(ids)
        try:
            while waiting:
                got, gone = await self._between(partial(_take_parked, p, frozenset(waiting)))
                parked.extend(got)
                waiting -= {s.request_id for s in got} | gone
                if waiting:
                    self._check_deadline("requests to park")
                    await asyncio.sleep(_POLL_S)
            # A request that was not in flight parks at once, but a copy relocating one of
            # its blocks may still ride a batch of its microbatch: let those land first.
            await self._settle("the batch's copies")
        except BaseException:
            await self.hand_over(parked)  # the rest park during the pause's drain
            raise
        if not parked:
            return
        states = await self.hand_over(parked, keep=False)
        home = self.m.members[HOME]
        group_blocks = [b for s in states for b in s.block_ids]
        try:
            reply = await self.m.ask(home, self._msg(el.HomeTake, requests=states))
            assert isinstance(reply, el.HomeBlocks)
            blocks = reply.blocks
            self.home_free = reply.free
            try:
                moved = await self._copy_home(states, blocks)
            except Exception:
                release = [b for bs in blocks for b in bs]
                await self.m.ask(home, self._msg(el.HomeAdopt, release=release))
                raise
        except Exception:
            # Still whole in their group blocks (reserved here): the pause restore takes them.
            self.leftover.extend(states)
            raise
        at_home = [
            msgspec.structs.replace(s, block_ids=bs) for s, bs in zip(states, blocks, strict=True)
        ]
        for s in at_home:  # the home's death must fail them from now on
            self.svc.announce(s, home.instance_id, home.address)
        try:
            await self.m.ask(home, self._msg(el.HomeAdopt, requests=at_home))
        except Exception as exc:  # refused (nothing adopted) or the home is gone
            for s in at_home:
                self.svc.fail_moved(s, f"live restore of group {self.m.group_id}: {exc}")
            await self._between(lambda: p.unreserve(group_blocks))
            raise
        await self._between(lambda: p.unreserve(group_blocks))
        for s in at_home:
            self.m.moved[s.request_id] = home.address
            if s.request_id in self.svc.aborted:  # the abort came while it was on its way
                self.svc.forward_abort(s.request_id, home.address)
        self.stats.home_requests += [
            (s.request_id, len(s.prompt_token_ids) + len(s.output_token_ids)) for s in at_home
        ]
        self.stats.moved += len(at_home)
        self.stats.batches += 1
        self.stats.moved_bytes += moved
        self.stats.stall_max_s = max(self.stats.stall_max_s, time.monotonic() - t0)

    async def _copy_home(self, states: list[el.RequestState], blocks: list[list[int]]) -> int:
        """Every member but the home sends its sub-blocks of the batch's group blocks into
        the whole blocks the home reserved (the home copied its own in HomeTake)."""
        g = self.m.g
        tables = self.m.tables
        ops = (
            (j, tables[j][k], HOME, e * g + j)
            for s, es in zip(states, blocks, strict=True)
            for k, e in zip(s.block_ids, es, strict=True)
            for j in range(g)
            if j != HOME
        )
        pairs = by_pair(ops)
        # Every transfer ends before a failure counts: the home may only release the
        # blocks once nothing writes into them any more.
        done = await asyncio.gather(
            *(transfer(self.m.members, src, dst, copies) for (src, dst), copies in pairs.items()),
            return_exceptions=True,
        )
        failed = [d for d in done if isinstance(d, BaseException)]
        if failed:
            raise failed[0]
        sub_bytes = self.pipeline.cache.layout.bytes_per_block
        own = sum(len(s.block_ids) for s in states) * sub_bytes  # the home's local copies
        return sum(d for d in done if isinstance(d, int)) + own

    async def hand_over(
        self, parked: list[el.RequestState], *, keep: bool = True
    ) -> list[el.RequestState]:
        """Parked requests leave the leader's streams (ended as moved), with their reply
        address; `keep`: into `leftover`, for the pause restore (their group blocks stay
        reserved until then)."""
        states = [
            msgspec.structs.replace(s, reply_to=self.svc.routes.get(s.request_id, s.reply_to))
            for s in parked
        ]
        for s in states:
            await self.svc.engine.hand_over(s.request_id)
        if keep:
            self.leftover.extend(states)
        return states

    async def _settle(self, what: str) -> None:
        p = self.pipeline
        mark = await self._between(lambda: p.launched)
        await self._until(lambda: p.settled(mark), what)

    # ------------------------------------------------------------- helpers
    def _msg(self, cls: Callable[..., T], **fields: Any) -> T:
        m = self.m
        return cls(self.svc.cfg.admin_token, m.group_id, m.epoch, **fields)

    def _check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise LiveRestoreFailed(f"deadline passed waiting for {what}")

    async def _until(self, cond: Callable[[], bool], what: str) -> None:
        while not await self._between(cond):
            self._check_deadline(what)
            await asyncio.sleep(_POLL_S)

    async def _between(self, fn: Callable[[], T]) -> T:
        """`fn()` on the leader's engine between two steps (the engine thread is idle)."""
        return await self.svc.engine.run_between_steps(fn)


def _take_parked(
    pipeline: PipelineEngine, ids: frozenset[str]
) -> tuple[list[el.RequestState], set[str]]:
    """The requests parked since the last call, and those of `ids` that finished or were
    aborted before they parked (one look between two steps: a step parks a request and
    takes it out of `requests` at once)."""
    got = pipeline.take_parked()
    taken = {s.request_id for s in got}
    return got, {r for r in ids if r not in pipeline.requests and r not in taken}
