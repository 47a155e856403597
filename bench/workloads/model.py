"""The workload data model every generator, trace loader and load client shares.

A workload is a list of sessions (conversations); a session is a list of turns (requests).
A turn carries only what it ADDS to the session: the gateway prepends the session's history
(every earlier turn's tokens and answers), so the prompt of turn i is

    sum(len(t.tokens) + t.max_tokens for t in turns[:i]) + len(turns[i].tokens)

assuming each answer is exactly `max_tokens` long (the load client sends ignore_eos=True).

Invariants (checked on construction, so a Workload in hand satisfies them):
- every turn has at least one token and max_tokens >= 1, think_s >= 0;
- every session has at least one turn; session ids are unique;
- sessions are sorted by arrival_s.
`fit_context` is how generators keep every request's prompt + max_tokens within a context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any


class WorkloadError(ValueError):
    """A bad workload spec, config value or arrival process; the message names the bad part."""


@dataclass(frozen=True)
class Turn:
    """One request of a session. `tokens` is what this turn ADDS to the session (the gateway
    prepends the session's history: every earlier turn's tokens and answers). The first turn
    of a session starts with BOS (id 1)."""

    tokens: tuple[int, ...]
    max_tokens: int  # answer length (the load client sends ignore_eos=True)
    think_s: float = 0.0  # pause after the previous turn's answer before this turn is sent

    def __post_init__(self) -> None:
        if not self.tokens:
            raise WorkloadError("a turn needs at least one token")
        if self.max_tokens < 1:
            raise WorkloadError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.think_s >= 0:  # also rejects nan
            raise WorkloadError(f"think_s must be >= 0, got {self.think_s}")


@dataclass(frozen=True)
class Session:
    session_id: str  # unique within the workload, e.g. "chat-0007"
    arrival_s: float  # seconds from the start of the run when its first turn is sent
    turns: tuple[Turn, ...]
    group: str = ""  # what it shares with others ("doc-3" in the docs workload, "" otherwise)

    def __post_init__(self) -> None:
        if not self.turns:
            raise WorkloadError(f"session {self.session_id!r} has no turns")

    def prompt_lengths(self) -> list[int]:
        """Each request's full prompt length (history + new tokens); see `prompt_lengths`."""
        return prompt_lengths(self.turns)


@dataclass(frozen=True)
class Workload:
    name: str  # "chat" | "docs" | "agent" | "sharegpt" | "burstgpt"
    sessions: tuple[Session, ...]  # sorted by arrival_s
    params: dict[str, Any]  # generator config + seed + arrival process, JSON-serializable

    def __post_init__(self) -> None:
        seen: set[str] = set()
        last = -math.inf
        for s in self.sessions:
            if s.session_id in seen:
                raise WorkloadError(f"{self.name}: duplicate session id {s.session_id!r}")
            if s.arrival_s < last:
                raise WorkloadError(f"{self.name}: sessions are not sorted by arrival_s")
            seen.add(s.session_id)
            last = s.arrival_s

    def num_requests(self) -> int:
        return sum(len(s.turns) for s in self.sessions)

    def summary(self) -> dict[str, float]:
        """Figures for a results file. Keys: sessions, requests, mean_turns (per session),
        mean_new_tokens (per turn), mean_prompt_tokens (per request, history included, each
        answer taken as max_tokens long), mean_max_tokens, duration_s (last arrival_s).
        Means of an empty workload are 0."""
        turns = [t for s in self.sessions for t in s.turns]
        prompts = [n for s in self.sessions for n in s.prompt_lengths()]
        return {
            "sessions": float(len(self.sessions)),
            "requests": float(len(turns)),
            "mean_turns": _mean([len(s.turns) for s in self.sessions]),
            "mean_new_tokens": _mean([len(t.tokens) for t in turns]),
            "mean_prompt_tokens": _mean(prompts),
            "mean_max_tokens": _mean([t.max_tokens for t in turns]),
            "duration_s": self.sessions[-1].arrival_s if self.sessions else 0.0,
        }

    def limit(self, sessions: int | None = None) -> Workload:
        """The first `sessions` sessions (by arrival); None means all of them."""
        if sessions is None or sessions >= len(self.sessions):
            return self
        if sessions < 0:
            raise WorkloadError(f"limit must be >= 0, got {sessions}")
        return replace(
            self, sessions=self.sessions[:sessions], params={**self.params, "limit": sessions}
        )


def prompt_lengths(turns: Sequence[Turn]) -> list[int]:
    """Each request's full prompt length: the history (earlier turns' tokens and answers,
    each answer exactly max_tokens long) plus the turn's own new tokens."""
    lengths = []
    history = 0
    for t in turns:
        lengths.append(history + len(t.tokens))
        history += len(t.tokens) + t.max_tokens
    return lengths


def fit_context(turns: Sequence[Turn], max_context: int) -> tuple[Turn, ...]:
    """The turns whose prompt + max_tokens fit in `max_context`: trailing turns that would
    exceed it are dropped. A session keeps at least its first turn: if even that is too long,
    its answer is cut to leave room for one prompt token and its tokens are truncated (the
    prefix is kept, so BOS and any shared prefix survive)."""
    if max_context < 2:
        raise WorkloadError(f"max_context must be >= 2, got {max_context}")
    if not turns:
        return ()
    kept: list[Turn] = []
    for turn, prompt in zip(turns, prompt_lengths(turns), strict=True):
        if prompt + turn.max_tokens <= max_context:
            kept.append(turn)
        elif not kept:
            max_tokens = min(turn.max_tokens, max_context - 1)
            kept.append(
                replace(turn, tokens=turn.tokens[: max_context - max_tokens], max_tokens=max_tokens)
            )
            break
        else:
            break
    return tuple(kept)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values)) / len(values) if values else 0.0
