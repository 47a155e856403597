"""Conversations kept by the gateway (pure): a session's history is the token ids of every
finished turn (its full prompt, then its answer), so the next turn's prompt starts with
exactly the tokens whose KV the cluster cached, and the caches can serve it.

Invariants: one turn at a time per session (a second one while the first runs is refused:
its history would miss the first answer); a session idle for `ttl_s` is forgotten; at
most `max_sessions` exist, at most `max_per_client` of them opened by one client.
`sessions` is kept in least-recently-used-first order (a turn moves its session to the
end), and so is each client's list in `by_owner`.

Fairness: opening past a cap evicts, never locks out. A client at its own cap loses its
own least recently used idle session; at the total cap the globally least recently used
idle session goes. Only when every candidate is busy (a turn in flight) is the open
refused, and then only for the client at its own cap, or while all sessions are busy.
Built without `max_per_client` (one tenant, as in unit tests) nothing is evicted: the
total cap refuses the next open.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from common.errors import InvalidRequestError


@dataclass
class Session:
    history: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: float = 0.0
    owner: bytes = b""  # the ZeroMQ identity of the client that opened it


class Sessions:
    def __init__(self, ttl_s: float, max_sessions: int, max_per_client: int | None = None):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.fair = max_per_client is not None  # evict (see above) rather than refuse
        self.max_per_client = max_per_client or max_sessions
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.by_owner: dict[bytes, OrderedDict[str, None]] = {}
        self.evicted = 0

    def open(self, now: float, owner: bytes = b"") -> str:
        """A new session for `owner`, evicting (see the module docstring) to make room."""
        self.expire(now)
        mine = self.by_owner.get(owner, OrderedDict())
        if len(mine) >= self.max_per_client:
            victim = next((k for k in mine if not self.sessions[k].busy), None)
            if victim is None or not self.fair:
                raise InvalidRequestError(
                    f"too many sessions for this client ({self.max_per_client}), every one "
                    "with a turn in progress; close some"
                )
            self._forget(victim)
            self.evicted += 1
        if len(self.sessions) >= self.max_sessions:
            victim = next((k for k, s in self.sessions.items() if not s.busy), None)
            if victim is None or not self.fair:
                raise InvalidRequestError(f"too many sessions ({self.max_sessions}); close some")
            self._forget(victim)
            self.evicted += 1
        sid = uuid.uuid4().hex
        self.sessions[sid] = Session(last_used=now, owner=owner)
        self.by_owner.setdefault(owner, OrderedDict())[sid] = None
        return sid

    def close(self, sid: str) -> None:
        if sid not in self.sessions:
            raise InvalidRequestError(f"unknown session {sid!r}")
        self._forget(sid)

    def begin_turn(self, sid: str, now: float) -> list[int]:
        """Mark the session busy and return its history (the new turn's prompt prefix)."""
        s = self.sessions.get(sid)
        if s is None:
            raise InvalidRequestError(f"unknown session {sid!r} (closed, expired or never opened)")
        if s.busy:
            raise InvalidRequestError(f"session {sid!r} already has a turn in progress")
        s.busy = True
        self._touch(sid, s, now)
        return list(s.history)

    def end_turn(self, sid: str, tokens: list[int] | None, now: float) -> None:
        """The turn ended: with `tokens` (prompt + answer) it becomes the history; without
        (failed, cancelled) the history stays as it was."""
        s = self.sessions.get(sid)
        if s is None:
            return
        s.busy = False
        self._touch(sid, s, now)
        if tokens is not None:
            s.history = tokens

    def expire(self, now: float) -> int:
        old = [k for k, s in self.sessions.items() if not s.busy and now - s.last_used > self.ttl_s]
        for k in old:
            self._forget(k)
        return len(old)

    def _touch(self, sid: str, s: Session, now: float) -> None:
        s.last_used = now
        self.sessions.move_to_end(sid)
        self.by_owner[s.owner].move_to_end(sid)

    def _forget(self, sid: str) -> None:
        s = self.sessions.pop(sid)
        mine = self.by_owner[s.owner]
        del mine[sid]
        if not mine:
            del self.by_owner[s.owner]
