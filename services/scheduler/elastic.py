"""The scheduler's pipeline groups (KunServe's commanded parameter drop): which groups
exist, who is in them, what each member runs, and what happened when. Pure: no sockets,
no event loop; every time is the caller's (monotonic `now`, wall `wall`).

    validate_drop(ids) ──▶ begin ──▶ FORMING ──ready(Ready...)──▶ commit ──▶ SERVING
          │ (refusal: ElasticError)     │ abort (nothing changed: the group is forgotten)
                                        └─ fail (a Commit went wrong) ──▶ BROKEN
    SERVING ──restoring──▶ RESTORING ──dissolved──▶ DISSOLVED
    SERVING | RESTORING ──a member down, or a Restore failed──▶ BROKEN

Invariants:
- an instance is a member of at most one *active* group (FORMING, SERVING, RESTORING);
  members of a DISSOLVED or BROKEN group are free again (placements, a new drop);
- members are ordered by instance id; rank i is `members[i]`, rank 0 is the leader;
- once the members' `Ready`s agree, rank i of g members over L layers holds
  [i*L/g, (i+1)*L/g): the ranges are disjoint and their union is [0, L) (g divides L);
- `epoch` grows with every group begun (aborted ones included), so no two groups share one;
- the timeline keeps the last `max_events` events, finished groups the last `max_finished`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.errors import ErrorKind, MemServeError
from common.protocol.elastic import FollowerCommitted, GroupServing, Ready, Restored
from services.scheduler.registry import Registry

FORMING = "FORMING"
SERVING = "SERVING"
RESTORING = "RESTORING"
BROKEN = "BROKEN"
DISSOLVED = "DISSOLVED"
ACTIVE = (FORMING, SERVING, RESTORING)
# Groups that take placements as one target (the leader's inbox holds them while restoring).
PLACING = (SERVING, RESTORING)
# The only role whose instances serve a whole request alone, so the only one grouped.
GROUP_ROLE = "colocated"

# The timeline's group column for the automatic controller's own events.
CONTROLLER = "-"

MAX_EVENTS = 512
MAX_FINISHED = 64


class ElasticError(MemServeError):
    """An elastic command refused or failed; the message is what the admin sees."""

    kind = ErrorKind.REFUSED


@dataclass(frozen=True)
class Event:
    at: float  # the caller's monotonic clock
    wall: float  # seconds since the epoch
    group_id: str
    name: str  # prepare | ready | aborted | committed | serving | restoring | dissolved | broken | ...
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": round(self.at, 6),
            "wall": round(self.wall, 6),
            "group_id": self.group_id,
            "event": self.name,
            **({"detail": self.detail} if self.detail else {}),
        }


@dataclass
class Group:
    group_id: str
    epoch: int
    members: list[str]  # by rank; members[0] is the leader
    state: str
    began_at: float  # monotonic: Prepare sent
    formed_at: float = 0.0  # wall clock of GroupServing (0: not formed)
    model: str = ""
    num_layers: int = 0
    layer_ranges: list[tuple[int, int]] = field(default_factory=list)  # by rank
    param_bytes: dict[str, int] = field(default_factory=dict)  # per member, resident
    freed_bytes: int = 0  # parameters dropped over all members (lent to the KV)
    budget_bytes: int = 0
    block_bytes: int = 0
    num_blocks: int = 0  # group blocks
    block_size: int = 0
    adopted: int = 0
    reason: str = ""  # why it broke

    @property
    def leader(self) -> str:
        return self.members[0]

    @property
    def followers(self) -> list[str]:
        return self.members[1:]

    def rank_of(self, instance_id: str) -> int:
        return self.members.index(instance_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group_id": self.group_id,
            "epoch": self.epoch,
            "state": self.state,
            "leader": self.leader,
            "members": [
                {
                    "instance_id": iid,
                    "rank": rank,
                    "layers": list(self.layer_ranges[rank]) if self.layer_ranges else [],
                    "param_bytes": self.param_bytes.get(iid, 0),
                }
                for rank, iid in enumerate(self.members)
            ],
            "model": self.model,
            "num_layers": self.num_layers,
            "formed_at": self.formed_at,
            "lent_bytes": self.freed_bytes,
            "freed_bytes": self.freed_bytes,
            "budget_bytes": self.budget_bytes,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "adopted": self.adopted,
            **({"reason": self.reason} if self.reason else {}),
        }


def layer_ranges(num_layers: int, g: int) -> list[tuple[int, int]]:
    """Rank i of `g` holds [i*L/g, (i+1)*L/g); `g` must divide `num_layers`."""
    if g < 1 or num_layers < 1 or num_layers % g:
        raise ElasticError(f"{g} members cannot split {num_layers} layers evenly")
    step = num_layers // g
    return [(i * step, (i + 1) * step) for i in range(g)]


def parse_ids(text: str) -> list[str]:
    """`a,b` (spaces allowed) as a list of ids, in the order given."""
    return [part.strip() for part in text.split(",") if part.strip()]


class Elastic:
    def __init__(self, max_events: int = MAX_EVENTS, max_finished: int = MAX_FINISHED) -> None:
        self.groups: dict[str, Group] = {}  # insertion order = age
        self.events: deque[Event] = deque(maxlen=max_events)
        self.max_finished = max_finished
        self._epochs = itertools.count(1)
        # Groups broken by a member's death, with the survivors to send Break (the shell
        # drains it after every heartbeat and tick).
        self.breaks: list[tuple[Group, list[str]]] = []

    # ------------------------------------------------------------- lookups
    def group_of(self, instance_id: str) -> Group | None:
        """The active group `instance_id` is a member of, if any."""
        for g in self.groups.values():
            if g.state in ACTIVE and instance_id in g.members:
                return g
        return None

    def placing(self) -> list[Group]:
        """Groups that take placements as one target (through their leader)."""
        return [g for g in self.groups.values() if g.state in PLACING]

    def hidden(self) -> set[str]:
        """Followers of placing groups: not placement targets of their own."""
        return {iid for g in self.placing() for iid in g.followers}

    def leader_group(self, instance_id: str) -> Group | None:
        """The placing group `instance_id` leads, if any."""
        for g in self.placing():
            if g.leader == instance_id:
                return g
        return None

    # ------------------------------------------------------------- drop
    def validate_drop(self, ids: Sequence[str], registry: Registry) -> list[str]:
        """The members of a drop of `ids`, by rank (sorted by id), or ElasticError.
        Nothing changes either way."""
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if list(ids).count(i) > 1})
            raise ElasticError(f"instance listed twice: {', '.join(dup)}")
        if len(ids) < 2:
            raise ElasticError(f"a group needs at least 2 instances, got {len(ids)}")
        for iid in ids:
            inst = registry.get(iid)
            if inst is None:
                known = ", ".join(i.instance_id for i in registry.instances()) or "none"
                raise ElasticError(f"unknown instance {iid!r} (registered: {known})")
            if inst.role != GROUP_ROLE:
                raise ElasticError(
                    f"instance {iid!r} is a {inst.role} instance; only {GROUP_ROLE} "
                    "instances form groups"
                )
            if not registry.is_eligible(inst):
                raise ElasticError(f"instance {iid!r} is {registry.state(inst)}")
            if not inst.control:
                raise ElasticError(f"instance {iid!r} names no control address")
            group = self.group_of(iid)
            if group is not None:
                raise ElasticError(
                    f"instance {iid!r} is already in group {group.group_id} ({group.state})"
                )
        return sorted(ids)

    def begin(self, members: Sequence[str], now: float, wall: float) -> Group:
        """A FORMING group of `members` (validated, by rank): Prepare goes out."""
        epoch = next(self._epochs)
        group = Group(f"g{epoch}", epoch, list(members), FORMING, now)
        self.groups[group.group_id] = group
        self._event(group, "prepare", now, wall, members=list(members))
        return group

    def ready(self, group: Group, readies: Mapping[str, Ready], now: float, wall: float) -> None:
        """Check that the members' `Ready`s agree (model, layers, budget, block bytes) and
        that the group splits the layers evenly; fix the layer ranges. ElasticError (the
        group is unchanged: the caller aborts) otherwise."""
        first = readies[group.leader]
        for key in ("model", "num_layers", "budget_bytes", "block_bytes"):
            values = {iid: getattr(readies[iid], key) for iid in group.members}
            if len(set(values.values())) > 1:
                said = ", ".join(f"{iid}: {v}" for iid, v in values.items())
                raise ElasticError(f"members differ in {key} ({said})")
        ranges = layer_ranges(first.num_layers, len(group.members))
        group.model = first.model
        group.num_layers = first.num_layers
        group.budget_bytes = first.budget_bytes
        group.block_bytes = first.block_bytes
        group.layer_ranges = ranges
        group.param_bytes = {iid: readies[iid].param_bytes for iid in group.members}
        self._event(group, "ready", now, wall, layers=[list(r) for r in ranges])

    def abort(self, group: Group, reason: str, now: float, wall: float) -> None:
        """Nothing was committed: the group is forgotten (its epoch stays used)."""
        assert group.state == FORMING, group.state
        del self.groups[group.group_id]
        self._event(group, "aborted", now, wall, reason=reason)

    def followers_committed(
        self, group: Group, replies: Sequence[FollowerCommitted], now: float, wall: float
    ) -> None:
        for r in replies:
            group.param_bytes[r.instance_id] = r.param_bytes
        self._event(
            group,
            "followers-committed",
            now,
            wall,
            freed_bytes=sum(r.freed_bytes for r in replies),
            requests=sum(len(r.requests) for r in replies),
        )

    def serving(
        self,
        group: Group,
        leader: GroupServing,
        followers: Sequence[FollowerCommitted],
        now: float,
        wall: float,
    ) -> None:
        group.state = SERVING
        group.formed_at = wall
        group.param_bytes[group.leader] = leader.param_bytes
        group.freed_bytes = leader.freed_bytes + sum(f.freed_bytes for f in followers)
        group.num_blocks = leader.num_blocks
        group.block_size = leader.block_size
        group.adopted = leader.adopted
        self._event(
            group,
            "serving",
            now,
            wall,
            num_blocks=leader.num_blocks,
            adopted=leader.adopted,
            freed_bytes=group.freed_bytes,
            took_s=round(now - group.began_at, 6),
        )

    # ------------------------------------------------------------- restore
    def resolve_restore(self, target: str) -> list[Group]:
        """The groups `restore TARGET` restores: `all` (every SERVING group, maybe none)
        or one SERVING group by id; ElasticError otherwise."""
        if target == "all":
            return [g for g in self.groups.values() if g.state == SERVING]
        group = self.groups.get(target)
        if group is None:
            serving = ", ".join(g.group_id for g in self.groups.values() if g.state == SERVING)
            raise ElasticError(f"unknown group {target!r} (serving: {serving or 'none'})")
        if group.state != SERVING:
            raise ElasticError(f"group {target} is {group.state}, not SERVING")
        return [group]

    def restoring(self, group: Group, now: float, wall: float) -> None:
        assert group.state == SERVING, group.state
        group.state = RESTORING
        self._event(group, "restoring", now, wall)

    def dissolved(self, group: Group, restored: Restored, now: float, wall: float) -> None:
        group.state = DISSOLVED
        self._event(
            group,
            "dissolved",
            now,
            wall,
            moved=restored.moved,
            recomputed=restored.recomputed,
            moved_bytes=restored.moved_bytes,
            pause_s=restored.pause_s,
            live=restored.live,
            moved_live=restored.moved_live,
            batches=restored.batches,
            stall_max_s=restored.stall_max_s,
            duration_s=restored.duration_s,
            fallback=restored.fallback,
        )
        self._prune()

    # ------------------------------------------------------------- failures
    def broken(self, group: Group, reason: str, now: float, wall: float) -> None:
        """The group cannot go on (a member died, a Commit or Restore failed)."""
        group.state = BROKEN
        group.reason = reason
        self._event(group, "broken", now, wall, reason=reason)
        self._prune()

    def on_instance_down(self, instance_id: str, reason: str, now: float, wall: float) -> None:
        """`instance_id` is gone: its placing group breaks, and its survivors are owed a
        Break (`breaks`). A FORMING group's drop fails by itself (its calls time out)."""
        group = self.group_of(instance_id)
        if group is None:
            return
        if group.state == FORMING:
            self._event(group, "member-down", now, wall, instance=instance_id, reason=reason)
            return
        self.broken(group, f"member {instance_id} down: {reason}", now, wall)
        self.breaks.append((group, [m for m in group.members if m != instance_id]))

    def take_breaks(self) -> list[tuple[Group, list[str]]]:
        breaks, self.breaks = self.breaks, []
        return breaks

    def note(self, group: Group, name: str, now: float, wall: float, **detail: Any) -> None:
        """Record an event of the shell's (e.g. who a Break reached)."""
        self._event(group, name, now, wall, **detail)

    def note_controller(self, name: str, now: float, wall: float, **detail: Any) -> None:
        """Record an event of the automatic controller's (votes, a plan, a fallback); its
        group column is CONTROLLER."""
        self.events.append(Event(now, wall, CONTROLLER, name, detail))

    # ------------------------------------------------------------- status
    def status(self) -> dict[str, Any]:
        return {
            "groups": [g.to_dict() for g in self.groups.values()],
            "events": [e.to_dict() for e in self.events],
        }

    def _event(self, group: Group, name: str, now: float, wall: float, **detail: Any) -> None:
        self.events.append(Event(now, wall, group.group_id, name, detail))

    def _prune(self) -> None:
        finished = [g for g in self.groups.values() if g.state not in ACTIVE]
        for g in finished[: max(0, len(finished) - self.max_finished)]:
            del self.groups[g.group_id]
