"""The "ready" channel: service process -> launcher, one message per process start.

Each process the launcher starts connects a PUSH socket to the launcher's PULL address
(given on its command line) and sends exactly one message: ``Ready`` once it has bound
everything it serves, or ``Failed`` when it cannot start. The launcher matches messages to
processes by ``instance_id``, which it chose itself; ``service`` is the kind of process
("worker", "scheduler", ...) and is informational.
"""

from __future__ import annotations

import msgspec


class Ready(msgspec.Struct, tag=True, frozen=True):
    """The process is up; ``endpoints`` maps a role ("rpc", "kv") to the bound address."""

    service: str
    instance_id: str
    pid: int
    endpoints: dict[str, str] = msgspec.field(default_factory=dict)


class Failed(msgspec.Struct, tag=True, frozen=True):
    """The process could not start; ``error`` says why, for the operator."""

    service: str
    instance_id: str
    error: str


ReadyMessage = Ready | Failed
