"""The leader's live KV exchange after a drop (the plan is `exchange.build_tables`'s).

Requests that were running on the members keep their KV: each block's own layers are in
place at its home, the other layers move to the members that hold them now, as MemPool
transfers between the daemons (one per source/destination pair of a batch). Batches of at
most `batch` requests, one batch in flight, each issued right after the leader starts a
step (its batch is on the ring: activations first), sized so that a batch takes about one
pipeline step at the bandwidth the previous batch saw. When a batch's copies are done its
requests join the group with their KV (their next token comes without recomputing
anything) and the sources become free group blocks; a batch that fails or times out falls
back to recompute for its requests (same tokens, only time is lost). New requests run
meanwhile; a stale request waits only for its own batch.

Every engine change goes through `call_between_steps` / `adopt` of the leader's async
engine: the pipeline engine is never touched while a step runs.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from common.logging import get_logger
from common.protocol import elastic as el
from services.worker.pipeline.exchange import Move
from services.worker.pipeline.moves import by_pair, transfer

log = get_logger(__name__)

# (source member, destination member, [(src sub-block, dst sub-block)]) -> bytes moved
Transfer = Callable[[int, int, list[tuple[int, int]]], Awaitable[int]]

MAX_BATCH = 8  # requests per batch (KunServe's public code)
_IDLE_TURN_S = 0.05  # no step to wait for: go on after this long


@dataclass
class ExchangeStats:
    started_at: float = field(default_factory=time.monotonic)
    exchanged: int = 0
    recomputed: int = 0  # batches that failed: recomputed instead
    nbytes: int = 0
    batches: int = 0
    seconds: float = 0.0  # copying
    stalls_s: list[float] = field(default_factory=list)  # commit -> joined, per request
    pending: int = 0
    done_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        stalls = sorted(self.stalls_s)
        return {
            "exchanged": self.exchanged,
            "recomputed": self.recomputed,
            "pending": self.pending,
            "bytes": self.nbytes,
            "batches": self.batches,
            "copy_s": round(self.seconds, 6),
            "stall_s_max": round(stalls[-1], 6) if stalls else 0.0,
            "stall_s_median": round(stalls[len(stalls) // 2], 6) if stalls else 0.0,
            "took_s": round((self.done_at or time.monotonic()) - self.started_at, 6),
        }


class Exchanger:
    def __init__(
        self,
        moves: Sequence[Move],
        states: dict[str, el.RequestState],
        members: Sequence[el.Member],
        *,
        join: Callable[[el.RequestState], None],
        between_steps: Callable[[Callable[[], None]], None],
        unreserve: Callable[[list[int]], None],
        stepped: asyncio.Event,
        sub_bytes: int,
        timeout_s: float = 10.0,
        transfer: Transfer | None = None,
    ):
        """`join(state)` adopts a request into the group (its blocks reserved or none);
        `unreserve(ids)` frees reserved group blocks, run through `between_steps`;
        `stepped` is set whenever the leader starts a step; `transfer(src, dst, copies)`
        moves sub-blocks between members and returns the bytes moved (default: a MemPool
        transfer between their daemons)."""
        self.pending = list(moves)
        self.states = states
        self.members = members
        self.join = join
        self.between_steps = between_steps
        self.unreserve = unreserve
        self.stepped = stepped
        self.sub_bytes = sub_bytes
        self.timeout_s = timeout_s
        self.transfer = transfer or self._transfer
        self.stats = ExchangeStats(pending=len(self.pending))
        self.moving: list[Move] = []  # the batch being copied
        self._bandwidth = 0.0  # bytes/s of the last batch
        self._last_step = 0.0
        self._step_s = 0.0  # time between the leader's last two steps

    async def run(self) -> None:
        try:
            while self.pending:
                await self._turn()
                self.moving = self._next_batch()
                await self._move(self.moving)
                self.moving = []
        finally:
            self.stats.done_at = time.monotonic()
            if self.pending or self.moving:  # cancelled (the group broke)
                log.info("exchange cancelled", requests=len(self.pending) + len(self.moving))

    def unjoined(self) -> list[el.RequestState]:
        """Requests that have not joined the group (the exchange was cancelled): their
        streams ended as moved, so their owner must end them."""
        return [self.states[mv.request_id] for mv in (*self.moving, *self.pending)]

    async def _turn(self) -> None:
        """Wait for the leader to put a step on the ring (or a moment, when it is idle)."""
        self.stepped.clear()
        try:
            await asyncio.wait_for(self.stepped.wait(), _IDLE_TURN_S)
        except TimeoutError:
            return
        now = time.monotonic()
        if self._last_step:
            self._step_s = now - self._last_step
        self._last_step = now

    def _next_batch(self) -> list[Move]:
        """At most MAX_BATCH requests, and about one step's worth of bytes at the last
        batch's bandwidth (always at least one request)."""
        cap = self._step_s * self._bandwidth if self._step_s and self._bandwidth else 0.0
        batch: list[Move] = []
        size = 0
        while self.pending and len(batch) < MAX_BATCH:
            nbytes = self.pending[0].num_copies * self.sub_bytes
            if batch and cap and size + nbytes > cap:
                break
            batch.append(self.pending.pop(0))
            size += nbytes
        return batch

    async def _move(self, batch: list[Move]) -> None:
        pairs = by_pair(c for mv in batch for c in mv.copies)
        t0 = time.monotonic()
        try:
            moved = await asyncio.wait_for(
                asyncio.gather(*(self.transfer(s, d, c) for (s, d), c in pairs.items())),
                self.timeout_s,
            )
        except Exception as exc:  # a failed or late batch: recompute its requests
            log.warning("exchange batch failed; recomputing", requests=len(batch), error=str(exc))
            for mv in batch:
                self.between_steps(functools.partial(self.unreserve, mv.group_blocks + mv.reserved))
                self._join(mv, kv=False)
            self.stats.recomputed += len(batch)
            return
        took = time.monotonic() - t0
        nbytes = sum(moved)
        self._bandwidth = nbytes / took if took > 0 else 0.0
        for mv in batch:
            self.between_steps(functools.partial(self.unreserve, mv.reserved))
            self._join(mv, kv=True)
        self.stats.exchanged += len(batch)
        self.stats.nbytes += nbytes
        self.stats.seconds += took
        self.stats.batches += 1

    def _join(self, mv: Move, *, kv: bool) -> None:
        state = self.states[mv.request_id]
        self.join(
            msgspec.structs.replace(
                state,
                block_ids=mv.group_blocks if kv else [],
                num_computed_tokens=state.num_computed_tokens if kv else 0,
            )
        )
        self.stats.pending = len(self.pending)
        self.stats.stalls_s.append(time.monotonic() - self.stats.started_at)

    async def _transfer(self, src: int, dst: int, copies: list[tuple[int, int]]) -> int:
        return await transfer(self.members, src, dst, copies, self.timeout_s)
