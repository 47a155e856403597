"""The transfer state machines: every move outside the table is refused (REFUSED, naming
the move) and leaves the state as it was; every legal path from the start ends in a
terminal state; every state is reachable and every live state can still end."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import pytest

from common.errors import ErrorKind
from services.mempool.pool import MemPoolError
from services.mempool.transfer_state import (
    RECEIVE_MOVES,
    SEND_MOVES,
    IllegalMove,
    ReceiveState,
    SendState,
    TransferState,
)

MACHINES: dict[str, tuple[Mapping[Any, frozenset[Any]], Any]] = {
    "receive": (RECEIVE_MOVES, ReceiveState.PREPARED),
    "send": (SEND_MOVES, SendState.PREPARING),
}


def _illegal(moves: Mapping[Any, frozenset[Any]]) -> list[tuple[Any, Any]]:
    return [(a, b) for a, b in itertools.product(moves, repeat=2) if b not in moves[a]]


def _paths(moves: Mapping[Any, frozenset[Any]], start: Any) -> list[list[Any]]:
    """Every path along the table from `start` to a terminal state (the table has no cycle)."""
    if not moves[start]:
        return [[start]]
    return [[start, *rest] for nxt in sorted(moves[start]) for rest in _paths(moves, nxt)]


ILLEGAL = [
    pytest.param(name, a, b, id=f"{name}:{a.name}->{b.name}")
    for name, (moves, _) in MACHINES.items()
    for a, b in _illegal(moves)
]
PATHS = [
    pytest.param(name, path, id=f"{name}:" + "->".join(s.name for s in path))
    for name, (moves, start) in MACHINES.items()
    for path in _paths(moves, start)
]


@pytest.mark.parametrize(("machine", "frm", "to"), ILLEGAL)
def test_every_illegal_move_is_refused(machine: str, frm: Any, to: Any) -> None:
    moves, _ = MACHINES[machine]
    state = TransferState(frm, moves, "transfer 7")
    with pytest.raises(IllegalMove) as info:
        state.advance(to)
    err = info.value
    assert isinstance(err, MemPoolError) and err.kind is ErrorKind.REFUSED
    assert f"transfer 7: {frm.name} -> {to.name}" in str(err)
    assert state.state is frm and not state.can(to)


@pytest.mark.parametrize(("machine", "path"), PATHS)
def test_every_legal_path_ends_in_a_terminal_state(machine: str, path: list[Any]) -> None:
    moves, start = MACHINES[machine]
    state = TransferState(start, moves, "transfer 7")
    for to in path[1:]:
        assert not state.terminal and state.can(to)
        state.advance(to)
        assert state.state is to
    assert state.terminal


@pytest.mark.parametrize("machine", list(MACHINES))
def test_the_table_covers_every_state_and_every_state_is_reachable(machine: str) -> None:
    moves, start = MACHINES[machine]
    states = set(type(start).__members__.values())
    assert set(moves) == states
    reached = {s for path in _paths(moves, start) for s in path}
    assert reached == states


def test_the_illegal_moves_are_the_whole_product_minus_the_table() -> None:
    for moves, _ in MACHINES.values():
        legal = sum(len(v) for v in moves.values())
        assert len(_illegal(moves)) == len(moves) ** 2 - legal > 0
