"""The elastic controller's monitor and policy (kunserve-plan.md section 5): from the
instances' KV signals, when to drop parameters and when a group restores.

Every `poll` (the shell calls it every `poll_s`; while the controller is off votes are
counted and shown, and nothing is decided) sees the
latest load of each ungrouped instance and of each SERVING group (its leader's figures,
in group blocks), and answers at most one decision:

    vote_i  = used_i / capacity_i >= drop_usage  and  0 < waiting_i >= free_i
    Drop    when votes >= max(1, ceil(n_ungrouped / 2)) on `debounce` polls in a row,
            with demand = sum over voters of max(0, waiting_i - free_i) blocks
    Restore group G when  used_G <= restore_usage * (blocks its members held before the
            drop)  and  its demand is not rising over the last `window` polls (the window
            full; an idle group's flat demand counts as falling: it cannot fall further)
            and  nothing waits in G  and  G is at least `min_group_s` old

No decision within `cooldown_s` of any drop or restore, commanded ones included (the
monitor sees groups appear and go), nor of a decision it made: votes that persist after
a drop of too little do not drop again at once, and a restore that leaves its members
hot again does not drop them at once either. Hysteresis: the gap between drop_usage
and restore_usage (the latter of the larger pre-drop capacity).

Pure: no sockets; every time is the caller's monotonic `now`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    drop_usage: float = 0.95
    restore_usage: float = 0.5
    window: int = 30
    debounce: int = 2
    cooldown_s: float = 5.0
    min_group_s: float = 5.0


@dataclass(frozen=True)
class Load:
    """One instance's (or a group leader's) KV figures, in its engine's blocks."""

    used: int = 0
    waiting: int = 0  # blocks the waiting queue needs
    capacity: int = 0
    waiting_requests: int = 0

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used)

    @property
    def usage(self) -> float:
        return self.used / self.capacity if self.capacity > 0 else 0.0

    @property
    def shortfall(self) -> int:
        """Queued blocks that do not fit in the free ones."""
        return max(0, self.waiting - self.free)


@dataclass(frozen=True)
class GroupView:
    group_id: str
    members: tuple[str, ...]
    since: float  # monotonic: when the drop began
    load: Load  # the leader's figures for the group


@dataclass(frozen=True)
class Drop:
    voters: tuple[str, ...]
    shortfall: dict[str, int]  # per voter, blocks
    votes: int
    needed: int

    @property
    def demand_blocks(self) -> int:
        return sum(self.shortfall.values())


@dataclass(frozen=True)
class Restore:
    group_id: str
    used: int
    held: int  # blocks its members held before the drop


Decision = Drop | Restore


@dataclass
class _GroupState:
    window: deque[int]
    checks: dict[str, bool] = field(default_factory=dict)


class Monitor:
    def __init__(self, thresholds: Thresholds, enabled: bool = False) -> None:
        self.t = thresholds
        self.enabled = enabled
        self.held: dict[str, int] = {}  # capacity each instance last had alone (blocks)
        self._streak = 0  # consecutive polls with enough votes
        self._groups: dict[str, _GroupState] = {}
        self._last_change: float | None = None  # a drop or restore (or a decision)
        self._last: dict[str, Any] = {}  # the last poll, for `status`
        self.last_decision: dict[str, Any] = {}

    def note_change(self, now: float) -> None:
        """A drop or restore happened or was tried (the cooldown starts again)."""
        self._last_change = now

    def cooldown_left(self, now: float) -> float:
        if self._last_change is None:
            return 0.0
        return max(0.0, self._last_change + self.t.cooldown_s - now)

    def poll(
        self, now: float, solo: Mapping[str, Load], groups: Sequence[GroupView]
    ) -> Decision | None:
        """One sample of every ungrouped instance (`solo`) and SERVING group: at most one
        decision (a restore first: it ends a group whose burst is over)."""
        for iid, load in solo.items():
            if load.capacity > 0:
                self.held[iid] = load.capacity
        self._track_groups(now, groups)
        votes = {iid: self._votes(load) for iid, load in solo.items()}
        voters = tuple(sorted(iid for iid, v in votes.items() if v))
        needed = max(1, math.ceil(len(solo) / 2))
        self._streak = self._streak + 1 if voters and len(voters) >= needed else 0
        cooling = self.cooldown_left(now)
        self._last = {
            "at": round(now, 6),
            "votes": {
                iid: {
                    "vote": votes[iid],
                    "usage": round(load.usage, 4),
                    "waiting_blocks": load.waiting,
                    "free_blocks": load.free,
                }
                for iid, load in sorted(solo.items())
            },
            "voters": list(voters),
            "needed": needed,
            "streak": self._streak,
            "cooldown_left_s": round(cooling, 3),
        }
        decision: Decision | None = None
        for view in groups:
            if self._restorable(now, view) and decision is None and not cooling:
                decision = Restore(view.group_id, view.load.used, self._held_by(view))
        if decision is None and not cooling and self._streak >= self.t.debounce:
            decision = Drop(
                voters, {iid: solo[iid].shortfall for iid in voters}, len(voters), needed
            )
        if decision is None or not self.enabled:
            return None  # (off: votes are counted and shown, nothing is decided)
        self._streak = 0
        self.note_change(now)
        return decision

    def _votes(self, load: Load) -> bool:
        return (
            load.capacity > 0
            and load.usage >= self.t.drop_usage
            and load.waiting > 0
            and load.waiting >= load.free
        )

    def _track_groups(self, now: float, groups: Sequence[GroupView]) -> None:
        ids = {g.group_id for g in groups}
        if ids != set(self._groups):
            self.note_change(now)  # a group formed or went: the cooldown starts
        for gid in [g for g in self._groups if g not in ids]:
            del self._groups[gid]
        for view in groups:
            state = self._groups.setdefault(view.group_id, _GroupState(deque(maxlen=self.t.window)))
            state.window.append(view.load.used)

    def _held_by(self, view: GroupView) -> int:
        """Blocks the members held alone before the drop (0: some member never seen)."""
        held = [self.held.get(m, 0) for m in view.members]
        return sum(held) if all(held) else 0

    def _restorable(self, now: float, view: GroupView) -> bool:
        state = self._groups[view.group_id]
        window = state.window
        held = self._held_by(view)
        state.checks = {
            "fits": held > 0 and view.load.used <= self.t.restore_usage * held,
            "falling": len(window) == window.maxlen and window[-1] <= window[0],
            "nothing_waits": view.load.waiting == 0 and view.load.waiting_requests == 0,
            "old_enough": now - view.since >= self.t.min_group_s,
        }
        return all(state.checks.values())

    def status(self, now: float) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "thresholds": {
                "drop_usage": self.t.drop_usage,
                "restore_usage": self.t.restore_usage,
                "window": self.t.window,
                "debounce": self.t.debounce,
                "cooldown_s": self.t.cooldown_s,
                "min_group_s": self.t.min_group_s,
            },
            "cooldown_left_s": round(self.cooldown_left(now), 3),
            "last_poll": self._last,
            "groups": {
                gid: {"window": list(s.window)[-5:], "checks": s.checks}
                for gid, s in self._groups.items()
            },
            "last_decision": self.last_decision,
        }
