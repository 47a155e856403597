"""When the supervisor restarts a child that exited, and after how long (pure).

    exit code 0 (an ordered stop: admin `shutdown`, SIGTERM) ──▶ not restarted; a scheduler
        or gateway that stops so ends the whole cluster (an admin `shutdown` ends both)
    exit code != 0, or killed by a signal (a crash)            ──▶ restarted after a backoff

Backoff per child: `initial_s`, doubling on each restart in a row, at most `max_s`; a child
that stayed up `stable_s` or longer starts again from `initial_s`. A restart that fails
(the child dies or fails before its readiness handshake) counts as one more crash.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

# A scheduler or gateway that stops ends the cluster: nothing is served without either.
CLUSTER_KINDS = frozenset({"scheduler", "gateway"})


class Verdict(Enum):
    RESTART = "restart"  # a crash: start it again on the same endpoints
    STOP_CLUSTER = "stop-cluster"  # the scheduler or gateway ended: the cluster ends
    REPORT = "report"  # a worker or daemon ended: reported, the cluster serves on


def crashed(returncode: int) -> bool:
    """A non-zero exit code, or a signal (negative)."""
    return returncode != 0


def verdict(kind: str, returncode: int, restart: bool) -> Verdict:
    if restart and crashed(returncode):
        return Verdict.RESTART
    return Verdict.STOP_CLUSTER if kind in CLUSTER_KINDS else Verdict.REPORT


@dataclass
class Backoff:
    """One child's restart delays. `next_delay(up_s)` is called once per crash with how
    long the crashed process had been up; it returns how long to wait before starting it
    again, and counts the attempt."""

    initial_s: float = 0.5
    max_s: float = 10.0
    stable_s: float = 30.0
    attempt: int = 0  # restarts in a row so far (0: the next one is the first)

    def next_delay(self, up_s: float) -> float:
        if up_s >= self.stable_s:
            self.attempt = 0
        delay = min(self.max_s, self.initial_s * 2**self.attempt)
        self.attempt += 1
        return delay
