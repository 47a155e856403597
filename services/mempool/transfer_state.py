"""A transfer's states and the one table of legal moves between them (pure; like SGLang's
`KVPoll`), for both sides of a transfer, plus the daemon's transfer counters.

Receiving daemon D, one record per transfer id (`incoming.py`):

    PREPARED ──commit──▶ COMMITTING ──every byte in, handed over──▶ COMMITTED
      │ │                  │ │ │
      │ │                  │ │ └─abort / deadline while the commit waits──▶ ABORTING
      │ │                  │ └─the wait or the hand-over failed──┐              │ that commit
      │ └─abort, refused commit───────────────────────────▶ ABORTED ◀───────────┘ fails, frees
      └─deadline────────────────────────────────────────▶ EXPIRED

    FAILED: from PREPARED, COMMITTING or ABORTING when `Receiver.cancel` cannot fence the
    transfer's late writes yet; left by the sender's abort (ABORTED) or the deadline (EXPIRED).

PREPARED, COMMITTING, ABORTING and FAILED records are live (they hold blocks or pages);
COMMITTED, ABORTED and EXPIRED are terminal (the record is forgotten, its memory handed
over or freed).

Sending daemon S, one leg per transfer (`send_leg.py`):

    PREPARING ──peer prepared──▶ SENDING ──bytes out──▶ COMMITTING ──peer committed──▶ DONE
        └─failed──▶ FAILED          └───────failed────────┴──▶ ABORTED (peer told to abort)

A move not in the table raises `IllegalMove` (ErrorKind.REFUSED) naming it, so a
second commit, a commit after an abort, or a bug's stray move is refused loudly.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from common.errors import ErrorKind
from services.mempool.pool import MemPoolError


class ReceiveState(enum.IntEnum):
    PREPARED = 0  # blocks (pages) held for it; bytes may be landing
    COMMITTING = 1  # a commit waits for the last bytes
    ABORTING = 2  # told to give up while a commit waits: that commit fails and frees
    FAILED = 3  # failed, but late writes are not fenced yet: freed by abort or deadline
    COMMITTED = 4  # the bytes are handed over (indexed, pinned, named)
    ABORTED = 5  # given up; what it held is freed
    EXPIRED = 6  # not committed by its deadline; what it held is freed


class SendState(enum.IntEnum):
    PREPARING = 0  # asking the peer to prepare
    SENDING = 1  # the peer holds blocks for it; bytes moving
    COMMITTING = 2  # asking the peer to commit
    DONE = 3
    FAILED = 4  # failed before the peer held anything
    ABORTED = 5  # failed after: the peer was told to abort


_R = ReceiveState
RECEIVE_MOVES: Mapping[ReceiveState, frozenset[ReceiveState]] = {
    _R.PREPARED: frozenset({_R.COMMITTING, _R.ABORTED, _R.EXPIRED, _R.FAILED}),
    _R.COMMITTING: frozenset({_R.COMMITTED, _R.ABORTING, _R.ABORTED, _R.FAILED}),
    _R.ABORTING: frozenset({_R.ABORTED, _R.FAILED}),
    _R.FAILED: frozenset({_R.ABORTED, _R.EXPIRED}),
    _R.COMMITTED: frozenset(),
    _R.ABORTED: frozenset(),
    _R.EXPIRED: frozenset(),
}

_S = SendState
SEND_MOVES: Mapping[SendState, frozenset[SendState]] = {
    _S.PREPARING: frozenset({_S.SENDING, _S.FAILED}),
    _S.SENDING: frozenset({_S.COMMITTING, _S.ABORTED}),
    _S.COMMITTING: frozenset({_S.DONE, _S.ABORTED}),
    _S.DONE: frozenset(),
    _S.FAILED: frozenset(),
    _S.ABORTED: frozenset(),
}


class IllegalMove(MemPoolError):
    """A move the table does not allow (a second commit, a commit after an abort, ...)."""

    kind = ErrorKind.REFUSED


S = TypeVar("S", ReceiveState, SendState)


class TransferState(Generic[S]):
    """One transfer's state; it changes only through `advance`, along `moves`."""

    __slots__ = ("moves", "state", "what")

    def __init__(self, start: S, moves: Mapping[S, frozenset[S]], what: str) -> None:
        self.state: S = start
        self.moves: Mapping[S, frozenset[S]] = moves
        self.what = what  # names the transfer in errors

    def can(self, to: S) -> bool:
        return to in self.moves[self.state]

    def advance(self, to: S) -> None:
        if to not in self.moves[self.state]:
            raise IllegalMove(f"{self.what}: {self.state.name} -> {to.name} is not a legal move")
        self.state = to

    @property
    def terminal(self) -> bool:
        return not self.moves[self.state]


def receive_state(transfer_id: int) -> TransferState[ReceiveState]:
    return TransferState(ReceiveState.PREPARED, RECEIVE_MOVES, f"transfer {transfer_id}")


def send_state(what: str) -> TransferState[SendState]:
    return TransferState(SendState.PREPARING, SEND_MOVES, what)


@dataclass
class TransferCounters:
    """Totals over every transfer of one daemon (its `Stats` reply)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    transfers_failed: int = 0
    # Per transport (shm, tcp, ...), the sending side: bytes moved and seconds the legs
    # took (prepare to commit), so bytes / seconds is the bandwidth a leg saw.
    sent_bytes: dict[str, int] = field(default_factory=dict)
    sent_seconds: dict[str, float] = field(default_factory=dict)

    def sent(self, transport: str, nbytes: int, seconds: float) -> None:
        self.bytes_sent += nbytes
        self.sent_bytes[transport] = self.sent_bytes.get(transport, 0) + nbytes
        self.sent_seconds[transport] = self.sent_seconds.get(transport, 0.0) + seconds
