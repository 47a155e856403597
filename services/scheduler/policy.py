"""Routing policies: given the eligible instances of one role and a request, pick one.

Load is what the scheduler itself charged (tokens placed and not yet released, counted
at placement time), never the heartbeat's lagging figures, so two placements in a row
never see the same idle instance. Ties go round in turn, never always to the first.

locality (MemServe's, with the SGLang router's balance rule)
    imbalanced := max_load - min_load > balance_abs_threshold_tokens
                  AND max_load > balance_rel_threshold * min_load
    imbalanced                                   -> least load
    best matched / prompt > cache_threshold      -> the best prefix holder (least load of them)
    otherwise                                    -> least load
least-load    fewest charged tokens, then lowest KV usage
round-robin   each eligible instance in turn (sorted by id)
session       the instance a session went to while it stays eligible; new ones to least load

Transfer vs recompute (`CostModel.fetch`): when another instance of the role holds a
longer prefix than the chosen one, pull the extra blocks if moving them is faster than
computing them: extra_blocks * block_bytes / transfer_bytes_per_s <
exec(x, y_here) - exec(x, y_there), with exec(x, y) = x (1 - y) / prefill_tokens_per_s +
attention_coeff * x^2 (1 - y), and only for at least `min_fetch_tokens` extra tokens.

Everything here is pure: the only state is the turn counters and session table.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from common.protocol.worker import Fetch


@dataclass(frozen=True)
class Candidate:
    instance_id: str
    load_tokens: int
    matched_tokens: int = 0  # cached prefix the global tree says it holds (usable part)
    kv_usage: float = 0.0  # used / total device KV blocks, from its last heartbeat
    mempool: str = ""
    block_size: int = 16
    block_bytes: int = 0


@dataclass(frozen=True)
class RequestInfo:
    num_tokens: int
    session_id: str = ""


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    reason: str  # why: prefix | load | imbalanced | turn | session | new-session


class _Turns:
    """Fair tie-breaking: the n-th tie goes to the (n mod k)-th of the k tied candidates."""

    def __init__(self) -> None:
        self.turn = 0

    def pick(self, tied: Sequence[Candidate]) -> Candidate:
        chosen = tied[self.turn % len(tied)]
        self.turn += 1
        return chosen


def _least_loaded(candidates: Sequence[Candidate], turns: _Turns) -> Candidate:
    key = min((c.load_tokens, c.kv_usage) for c in candidates)
    return turns.pick([c for c in candidates if (c.load_tokens, c.kv_usage) == key])


class Policy(ABC):
    """`choose` takes a non-empty list of candidates sorted by id and returns one of them."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.turns = _Turns()

    @abstractmethod
    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Choice: ...


class LeastLoad(Policy):
    name = "least-load"

    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Choice:
        return Choice(_least_loaded(candidates, self.turns), "load")


class RoundRobin(Policy):
    name = "round-robin"

    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Choice:
        return Choice(self.turns.pick(candidates), "turn")


class Locality(Policy):
    name = "locality"

    def __init__(self, abs_threshold_tokens: int, rel_threshold: float, cache_threshold: float):
        super().__init__()
        self.abs_threshold_tokens = abs_threshold_tokens
        self.rel_threshold = rel_threshold
        self.cache_threshold = cache_threshold

    def imbalanced(self, candidates: Sequence[Candidate]) -> bool:
        loads = [c.load_tokens for c in candidates]
        lo, hi = min(loads), max(loads)
        return hi - lo > self.abs_threshold_tokens and hi > self.rel_threshold * lo

    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Choice:
        if self.imbalanced(candidates):
            return Choice(_least_loaded(candidates, self.turns), "imbalanced")
        best = max(c.matched_tokens for c in candidates)
        if best > 0 and best > self.cache_threshold * max(1, request.num_tokens):
            holders = [c for c in candidates if c.matched_tokens == best]
            return Choice(_least_loaded(holders, self.turns), "prefix")
        return Choice(_least_loaded(candidates, self.turns), "load")


class Session(Policy):
    name = "session"

    def __init__(self, max_sessions: int = 100_000):
        super().__init__()
        self.max_sessions = max_sessions
        self._affinity: OrderedDict[str, str] = OrderedDict()  # session -> instance, LRU

    def choose(self, candidates: Sequence[Candidate], request: RequestInfo) -> Choice:
        sid = request.session_id
        if sid:
            iid = self._affinity.get(sid)
            for c in candidates:
                if c.instance_id == iid:
                    self._affinity.move_to_end(sid)
                    return Choice(c, "session")
        chosen = _least_loaded(candidates, self.turns)
        if sid:
            self._affinity[sid] = chosen.instance_id
            self._affinity.move_to_end(sid)
            while len(self._affinity) > self.max_sessions:
                self._affinity.popitem(last=False)
        return Choice(chosen, "new-session")


@dataclass(frozen=True)
class CostModel:
    prefill_tokens_per_s: float
    attention_coeff: float  # seconds per token^2
    transfer_bytes_per_s: float
    min_fetch_tokens: int

    def exec_s(self, num_tokens: int, cached_tokens: int) -> float:
        """Seconds to prefill `num_tokens` of which `cached_tokens` are cached."""
        x = num_tokens
        uncached = 1.0 - min(cached_tokens, x) / x if x > 0 else 0.0
        return x * uncached / self.prefill_tokens_per_s + self.attention_coeff * x * x * uncached

    def transfer_s(self, num_blocks: int, block_bytes: int) -> float:
        return num_blocks * block_bytes / self.transfer_bytes_per_s

    def fetch(
        self, chosen: Candidate, others: Sequence[Candidate], num_tokens: int
    ) -> Fetch | None:
        """Pull a longer prefix from one of `others` into `chosen`, or None (recompute)."""
        sources = [
            c
            for c in others
            if c.instance_id != chosen.instance_id
            and c.block_size == chosen.block_size
            and c.matched_tokens > chosen.matched_tokens
            and c.mempool
        ]
        if not sources:
            return None
        # The longest prefix; among equals the least loaded daemon, then by id (stable).
        src = min(sources, key=lambda c: (-c.matched_tokens, c.load_tokens, c.instance_id))
        extra = src.matched_tokens - chosen.matched_tokens
        if extra < self.min_fetch_tokens:
            return None
        blocks = -(-extra // src.block_size)
        transfer = self.transfer_s(blocks, src.block_bytes or chosen.block_bytes)
        saved = self.exec_s(num_tokens, chosen.matched_tokens) - self.exec_s(
            num_tokens, src.matched_tokens
        )
        if transfer >= saved:
            return None
        return Fetch(src.instance_id, mempool=src.mempool, num_tokens=src.matched_tokens)


def make_policy(
    name: str,
    *,
    abs_threshold_tokens: int = 2048,
    rel_threshold: float = 1.5,
    cache_threshold: float = 0.3,
) -> Policy:
    if name == Locality.name:
        return Locality(abs_threshold_tokens, rel_threshold, cache_threshold)
    if name == LeastLoad.name:
        return LeastLoad()
    if name == RoundRobin.name:
        return RoundRobin()
    if name == Session.name:
        return Session()
    raise ValueError(
        f"unknown policy {name!r}; choose one of locality, least-load, round-robin, session"
    )
