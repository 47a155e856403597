"""The "client" channel: client (DEALER) <-> gateway (ROUTER), streaming.

    client                                  gateway
      OpenSession ───────────────────────▶
                  ◀─────────────────────── SessionOpened(session_id)
      Complete(request_id, prompt, ...) ─▶
                  ◀─────────────────────── Chunk(text) ... Chunk(text)
                  ◀─────────────────────── Final(finish_reason | error, timings)
      Cancel(request_id) ────────────────▶   (the request ends with a Final "abort")
      Ping ──────────────────────────────▶
                  ◀─────────────────────── Pong   (the client's liveness check)
      Status ────────────────────────────▶
                  ◀─────────────────────── StatusReport   (can the cluster serve?)

Every `Complete` gets exactly one `Final`, whatever happens (bad input, overload, a dead
worker): an error is reported there, never by silence. A request inside a session is the
next turn of that conversation: the gateway prepends the session's history (earlier prompts
and answers), which is what lets the cluster's caches serve it. Request ids are chosen by
the client and must be unique among its requests in flight.
"""

from __future__ import annotations

import msgspec

from common.sampling import SamplingParams


class OpenSession(msgspec.Struct, tag=True, frozen=True):
    pass


class CloseSession(msgspec.Struct, tag=True, frozen=True):
    session_id: str


class Complete(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Exactly one of `prompt` (text, tokenized by the gateway) and `token_ids`."""

    request_id: str
    prompt: str | None = None
    token_ids: list[int] | None = None
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    session_id: str = ""
    # A routing hint without a session's history (the HTTP API's `user` / X-Session-Id:
    # each request carries its whole conversation): the scheduler's session policy keeps
    # requests with one key on one instance. Bounded like the ids (`max_id_bytes`).
    route_key: str = ""


class Cancel(msgspec.Struct, tag=True, frozen=True):
    request_id: str


class Ping(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """Is the gateway there? Answered by a `Pong` from the gateway's own event loop, so
    an answer proves the process is alive and serving, not only its TCP port.

    `waiting`: the client's request ids still waiting for an answer (at most
    `MAX_PING_IDS` are looked at). The `Pong` names those the gateway does not hold for
    this client: a gateway restarted on the same address, or a connection re-made (a new
    ZeroMQ identity), answers pings but can never finish those requests."""

    waiting: list[str] = msgspec.field(default_factory=list)


MAX_PING_IDS = 256


class Status(msgspec.Struct, tag=True, frozen=True):
    """Can the cluster serve? Answered by a `StatusReport` from what the gateway last
    heard from the scheduler (its `GatewayKnown`, every `alive_interval_s`): nothing here
    waits on the scheduler."""


ClientRequest = OpenSession | CloseSession | Complete | Cancel | Ping | Status


class SessionOpened(msgspec.Struct, tag=True, frozen=True):
    session_id: str


class SessionClosed(msgspec.Struct, tag=True, frozen=True):
    session_id: str
    error: str = ""


class Chunk(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    request_id: str
    text: str
    token_ids: list[int] = msgspec.field(default_factory=list)


class Final(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """The last message of a request. `finish_reason`: stop | length | abort | error."""

    request_id: str
    finish_reason: str
    error: str = ""
    text: str = ""  # text held back until the end (an undecided stop-string prefix)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    ttft_s: float = 0.0  # gateway receipt -> first token out
    tpot_s: float = 0.0  # mean time per output token after the first
    total_s: float = 0.0
    instances: list[str] = msgspec.field(default_factory=list)


class Pong(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    unknown: list[str] = msgspec.field(default_factory=list)  # of the Ping's `waiting`


class StatusReport(msgspec.Struct, tag=True, frozen=True, omit_defaults=True):
    """`scheduler_ok`: the scheduler answered the gateway recently (within a few alive
    intervals); `instances`: per role, the instances that may take placements, as the
    scheduler last said; `needs`: the roles the current mode places on. `ready`: the
    scheduler is reachable and every needed role has an instance; else `reason` says why."""

    ready: bool
    scheduler_ok: bool = False
    instances: dict[str, int] = msgspec.field(default_factory=dict)
    needs: list[str] = msgspec.field(default_factory=list)
    reason: str = ""


ClientReply = SessionOpened | SessionClosed | Chunk | Final | Pong | StatusReport
