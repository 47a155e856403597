"""The drop planner (KunServe's greedy merge, kunserve-plan.md section 6): which instances
drop their replicated parameters, in which groups, to free at least the queued demand.

    every candidate is a group of one in a min-heap by (size, key)
    while >= 2 groups remain and freed < demand:
        pop the two smallest; size s = s0 + s1
        s > max_group or s does not divide L: g1 goes back, g0 is set aside (no later
                                               partner is smaller than g1)
        else merge: freed += one full copy (two groups that each held a full copy of the
                    parameters now share one)
    a plan (the groups of >= 2) iff freed >= demand; else None: the caller falls back to
    the instances' own KV-centric preemption

Why smallest first: a request's time per token grows with the stages it crosses, so the
plan merges as few instances as it can and keeps groups balanced. `key` among equal sizes:
`(host, -usage, id)`: members of one host pair first (their KV moves over shared memory),
the hottest of them first (their queues are what the drop is for). v1: candidates are
ungrouped instances only (a running group is never merged: new layer ranges need a
restore first).

Invariants of a returned plan: every group has 2..max_group members, its size divides L,
no instance is in two groups, and member rank i (by instance id) holds layers
[i*L/g, (i+1)*L/g), so each group holds one full copy. Pure: no sockets, no clock.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """An instance that may join a group: healthy, ungrouped, colocated, and of the one
    model, layer count and budget every candidate of a plan shares (the caller's filter)."""

    instance_id: str
    host: str = ""
    usage: float = 0.0  # KV used / capacity

    def key(self) -> tuple[str, float, str]:
        return (self.host, -self.usage, self.instance_id)


@dataclass(frozen=True)
class Plan:
    groups: list[list[str]]  # members by rank (instance id order); rank 0 leads
    freed_bytes: int  # parameter bytes the plan frees (estimate: one copy per merge)
    demand_bytes: int
    set_aside: list[str] = field(default_factory=list)  # candidates no group could take


def plan_drop(
    candidates: Sequence[Candidate],
    demand_bytes: int,
    param_bytes: int,
    num_layers: int,
    max_group: int = 2,
) -> Plan | None:
    """The smallest groups of `candidates` that free at least `demand_bytes` (each merge
    frees one full copy, `param_bytes`), or None when no plan frees enough. Nothing queued
    (`demand_bytes <= 0`): an empty plan, no merge."""
    if num_layers < 1 or max_group < 2 or param_bytes <= 0:
        return None if demand_bytes > 0 else Plan([], 0, demand_bytes)
    heap: list[tuple[int, tuple[str, float, str], list[Candidate]]] = [
        (1, c.key(), [c]) for c in candidates
    ]
    heapq.heapify(heap)
    aside: list[list[Candidate]] = []
    freed = 0
    while len(heap) >= 2 and freed < demand_bytes:
        s0, _, g0 = heapq.heappop(heap)
        s1, k1, g1 = heapq.heappop(heap)
        size = s0 + s1
        if size > max_group or num_layers % size:
            heapq.heappush(heap, (s1, k1, g1))
            aside.append(g0)
            continue
        merged = g0 + g1
        freed += param_bytes
        heapq.heappush(heap, (size, _group_key(merged), merged))
    if freed < demand_bytes:
        return None
    groups = sorted(sorted(c.instance_id for c in g) for _, _, g in heap if len(g) >= 2)
    left = sorted(c.instance_id for g in aside for c in g)
    return Plan(groups, freed, demand_bytes, left)


def _group_key(members: list[Candidate]) -> tuple[str, float, str]:
    hosts = sorted(c.host for c in members)
    hottest = max(c.usage for c in members)
    return (hosts[0], -hottest, min(c.instance_id for c in members))


def host_of(address: str) -> str:
    """The host part of a `tcp://host:port` address ("" for others)."""
    if not address.startswith("tcp://"):
        return ""
    return address[len("tcp://") :].rpartition(":")[0]
