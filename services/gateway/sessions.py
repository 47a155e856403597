"""Conversations kept by the gateway (pure): a session's history is the token ids of every
finished turn (its full prompt, then its answer), so the next turn's prompt starts with
exactly the tokens whose KV the cluster cached, and the caches can serve it.

Invariants: one turn at a time per session (a second one while the first runs is refused:
its history would miss the first answer); a session idle for `ttl_s` is forgotten; at
most `max_sessions` exist.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from common.errors import InvalidRequestError


@dataclass
class Session:
    history: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: float = 0.0


class Sessions:
    def __init__(self, ttl_s: float, max_sessions: int):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.sessions: dict[str, Session] = {}

    def open(self, now: float) -> str:
        self.expire(now)
        if len(self.sessions) >= self.max_sessions:
            raise InvalidRequestError(f"too many sessions ({self.max_sessions}); close some")
        sid = uuid.uuid4().hex
        self.sessions[sid] = Session(last_used=now)
        return sid

    def close(self, sid: str) -> None:
        if self.sessions.pop(sid, None) is None:
            raise InvalidRequestError(f"unknown session {sid!r}")

    def begin_turn(self, sid: str, now: float) -> list[int]:
        """Mark the session busy and return its history (the new turn's prompt prefix)."""
        s = self.sessions.get(sid)
        if s is None:
            raise InvalidRequestError(f"unknown session {sid!r} (closed, expired or never opened)")
        if s.busy:
            raise InvalidRequestError(f"session {sid!r} already has a turn in progress")
        s.busy, s.last_used = True, now
        return list(s.history)

    def end_turn(self, sid: str, tokens: list[int] | None, now: float) -> None:
        """The turn ended: with `tokens` (prompt + answer) it becomes the history; without
        (failed, cancelled) the history stays as it was."""
        s = self.sessions.get(sid)
        if s is None:
            return
        s.busy, s.last_used = False, now
        if tokens is not None:
            s.history = tokens

    def expire(self, now: float) -> int:
        old = [k for k, s in self.sessions.items() if not s.busy and now - s.last_used > self.ttl_s]
        for k in old:
            del self.sessions[k]
        return len(old)
