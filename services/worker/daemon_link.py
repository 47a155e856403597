"""A worker's view of its MemPool daemon (pure): the state machine behind the worker's
`healthy` flag and its re-attach to a restarted daemon.

    ATTACHED ──the engine's connection dropped──▶ LOST, fenced       [FAIL_ALL]
    ATTACHED ──`strikes` checks in a row unanswered──▶ LOST          [FAIL_ALL]
    ATTACHED | LOST ──answer from another incarnation, or fenced──▶ REATTACHING [REATTACH]
    LOST ──answer from the same incarnation, not fenced (a stall)──▶ ATTACHED
    REATTACHING ──attached to the new daemon──▶ ATTACHED
    REATTACHING ──attach failed──▶ REATTACHING, retried after a backoff (doubling, capped)

Fenced: the engine closed its own client the moment its connection to the daemon dropped
(MempoolEngine watches it), so no request it queued meanwhile (a lease, an insert of block
ids from the old daemon) can reach the daemon that comes up next on the same address;
such an engine cannot go on, whatever daemon answers next.

Invariants: the worker is healthy (serves, says so in its heartbeats) only while
ATTACHED. REATTACH is returned once per spell: the shell then fails the requests in flight
(their KV lived in the old daemon's memory), drops the old engine's leases and region
mapping without a word to the daemon (the old block ids mean nothing to a new one), and
attaches as at start-up until `reattached` (or `reattach_failed`, and again). The
incarnation is the daemon's `StatsReply.incarnation` / `InfoReply.incarnation`; checks
go through a client of their own, never the engine's.
"""

from __future__ import annotations

from enum import Enum


class LinkState(Enum):
    ATTACHED = "attached"
    LOST = "lost"
    REATTACHING = "reattaching"


class LinkAction(Enum):
    NONE = "none"
    FAIL_ALL = "fail-all"  # the daemon stopped answering: end the requests in flight
    REATTACH = "reattach"  # the daemon is another process: drop everything, attach again


class DaemonLink:
    def __init__(
        self,
        incarnation: str,
        *,
        strikes: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 5.0,
    ) -> None:
        self.incarnation = incarnation
        self.state = LinkState.ATTACHED
        self.strikes = strikes
        self.misses = 0  # checks in a row without an answer
        self.fenced = False  # the engine's client closed itself: it cannot go on
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.failed_attaches = 0  # in a row, in this REATTACHING spell
        self.reattaches = 0  # new incarnations attached to, over the worker's life

    @property
    def healthy(self) -> bool:
        return self.state is LinkState.ATTACHED

    def answered(self, incarnation: str) -> LinkAction:
        """The daemon answered a check, as `incarnation`."""
        if self.state is LinkState.REATTACHING:
            return LinkAction.NONE  # the attach in progress decides
        self.misses = 0
        if incarnation != self.incarnation or self.fenced:
            self.state = LinkState.REATTACHING
            self.failed_attaches = 0
            return LinkAction.REATTACH
        self.state = LinkState.ATTACHED
        return LinkAction.NONE

    def missed(self) -> LinkAction:
        """A check got no answer."""
        if self.state is not LinkState.ATTACHED:
            return LinkAction.NONE
        self.misses += 1
        if self.misses >= self.strikes:
            self.state = LinkState.LOST
            return LinkAction.FAIL_ALL
        return LinkAction.NONE

    def disconnected(self) -> LinkAction:
        """The engine's connection to the daemon dropped (it fenced itself)."""
        if self.state is LinkState.REATTACHING:
            return LinkAction.NONE
        self.fenced = True
        if self.state is LinkState.LOST:
            return LinkAction.NONE
        self.state = LinkState.LOST
        return LinkAction.FAIL_ALL

    def reattached(self, incarnation: str) -> None:
        assert self.state is LinkState.REATTACHING, self.state
        self.incarnation = incarnation
        self.state = LinkState.ATTACHED
        self.misses = 0
        self.fenced = False
        self.reattaches += 1

    def reattach_failed(self) -> float:
        """How long to wait before the next attempt."""
        assert self.state is LinkState.REATTACHING, self.state
        delay = min(self.backoff_max_s, self.backoff_s * 2**self.failed_attaches)
        self.failed_attaches += 1
        return delay
