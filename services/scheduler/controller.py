"""The elastic controller's pure half: the monitor (monitor.py) fed from the registry and
the groups, the planner (planner.py) fed from a drop decision, and the timeline entries
of both (votes, plans, fallbacks, on/off). The shell (elastic_control.py) runs what it
decides through the same drop and restore as `memserve admin elastic drop / restore`.

    every poll_s ─▶ poll(now): ungrouped eligible colocated instances ─┐
                               SERVING groups (their leaders' figures) ─┴▶ Monitor.poll
         Drop ─▶ plan(drop): candidates of the voters' kind ─▶ plan_drop ─▶ groups | None
                  (None: the instances keep preempting as before, KV-centric; the
                  timeline says so)
         Restore ─▶ the group's restore

Candidates of one plan share model, layer count, budget, one copy's parameter bytes and
block bytes (what a drop's `Ready`s must agree on). Pure: the caller's clocks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.scheduler.config import SchedulerConfig
from services.scheduler.elastic import ACTIVE, GROUP_ROLE, SERVING, Elastic
from services.scheduler.monitor import Decision, Drop, GroupView, Load, Monitor, Thresholds
from services.scheduler.planner import Candidate, Plan, host_of, plan_drop
from services.scheduler.registry import Instance, Registry

Kind = tuple[str, int, int, int, int]  # model, layers, budget, param bytes, block bytes


def thresholds(cfg: SchedulerConfig) -> Thresholds:
    return Thresholds(
        drop_usage=cfg.elastic_drop_usage,
        restore_usage=cfg.elastic_restore_usage,
        window=cfg.elastic_window,
        debounce=cfg.elastic_debounce,
        cooldown_s=cfg.elastic_cooldown_s,
        min_group_s=cfg.elastic_min_group_s,
    )


def load_of(inst: Instance) -> Load:
    x = inst.load
    return Load(x.used_blocks, x.waiting_blocks, x.capacity_blocks, x.waiting_requests)


def kind_of(inst: Instance) -> Kind:
    return (inst.model, inst.num_layers, inst.budget_bytes, inst.param_bytes, inst.block_bytes)


class Controller:
    def __init__(
        self,
        cfg: SchedulerConfig,
        registry: Registry,
        elastic: Elastic,
        wall_clock: Callable[[], float],
    ) -> None:
        self.registry = registry
        self.elastic = elastic
        self.wall_clock = wall_clock
        self.max_group = cfg.elastic_max_group
        self.strategy = cfg.elastic_strategy
        self.exchange = cfg.elastic_exchange  # Commit.exchange of an automatic drop
        self.restore = cfg.elastic_restore  # False: groups are never restored by the controller
        self.monitor = Monitor(thresholds(cfg), enabled=cfg.elastic_auto)

    @property
    def enabled(self) -> bool:
        return self.monitor.enabled

    def set_enabled(self, on: bool, now: float) -> dict[str, Any]:
        was = self.monitor.enabled
        self.monitor.enabled = on
        if on != was:
            self.elastic.note_controller(
                "controller-on" if on else "controller-off", now, self.wall_clock()
            )
        return {"controller": "on" if on else "off", "was": "on" if was else "off"}

    # ------------------------------------------------------------- monitor
    def solo(self) -> list[Instance]:
        """Instances that may vote and join a group: eligible, colocated, ungrouped."""
        grouped = {m for g in self.elastic.groups.values() if g.state in ACTIVE for m in g.members}
        return [i for i in self.registry.eligible(GROUP_ROLE) if i.instance_id not in grouped]

    def poll(self, now: float) -> Decision | None:
        solo = {i.instance_id: load_of(i) for i in self.solo()}
        groups = []
        for g in self.elastic.groups.values():
            leader = self.registry.get(g.leader)
            # Without automatic restores the monitor never sees a group, so it never wants
            # one restored (and its cooldown is not restarted by a restore it may not run).
            if g.state == SERVING and leader is not None and self.restore:
                groups.append(GroupView(g.group_id, tuple(g.members), g.began_at, load_of(leader)))
        decision = self.monitor.poll(now, solo, groups)
        wall = self.wall_clock()
        if isinstance(decision, Drop):
            self.elastic.note_controller(
                "votes",
                now,
                wall,
                voters=list(decision.voters),
                needed=decision.needed,
                shortfall_blocks=decision.shortfall,
            )
        elif decision is not None:
            self.elastic.note_controller(
                "restore-wanted",
                now,
                wall,
                group=decision.group_id,
                used_blocks=decision.used,
                held_blocks=decision.held,
            )
        if decision is not None:
            self.monitor.last_decision = {"at": round(now, 6), "decision": type(decision).__name__}
        return decision

    def changed(self, now: float) -> None:
        """A drop or restore ended (whatever its outcome): the cooldown runs from here."""
        self.monitor.note_change(now)

    # ------------------------------------------------------------- planner
    def plan(self, drop: Drop, now: float) -> Plan | None:
        """The groups to form for `drop`, or None (the timeline says why: the instances
        go on preempting, KV-centric)."""
        wall = self.wall_clock()
        solo = {i.instance_id: i for i in self.solo()}
        voters = [solo[v] for v in drop.voters if v in solo]
        kinds = Counter(kind_of(i) for i in voters if i.num_layers > 0 and i.param_bytes > 0)
        if not kinds:
            self._fallback(now, wall, "the voters did not report their model (older workers)")
            return None
        kind = kinds.most_common(1)[0][0]
        _, num_layers, _, param_bytes, block_bytes = kind
        cands = [
            Candidate(i.instance_id, host_of(i.address), load_of(i).usage)
            for i in solo.values()
            if kind_of(i) == kind and i.control
        ]
        demand = sum(
            drop.shortfall[i.instance_id] * block_bytes for i in voters if kind_of(i) == kind
        )
        plan = plan_drop(cands, demand, param_bytes, num_layers, self.max_group)
        detail = {
            "demand_bytes": demand,
            "candidates": [c.instance_id for c in cands],
            "max_group": self.max_group,
        }
        if plan is None:
            self._fallback(
                now,
                wall,
                "no feasible plan frees the queued demand",
                param_bytes=param_bytes,
                **detail,
            )
            return None
        if not plan.groups:
            self._fallback(now, wall, "nothing queued beyond the free blocks", **detail)
            return None
        self.elastic.note_controller(
            "plan", now, wall, groups=plan.groups, freed_bytes=plan.freed_bytes, **detail
        )
        return plan

    def pick_migration(self, drop: Drop, serving: dict[str, str], now: float) -> Migration | None:
        """The KV-centric answer to `drop` (strategy `migrate`): move the request placed
        last on the fullest voter (`serving`: request -> instance, in placement order) to
        the solo instance with the most free blocks, one that is not voting; None when
        nothing can move (the timeline says so)."""
        wall = self.wall_clock()
        solo = {i.instance_id: i for i in self.solo()}
        loads = {iid: load_of(i) for iid, i in solo.items()}
        voters = sorted((v for v in drop.voters if v in loads), key=lambda v: (-loads[v].usage, v))
        free = {iid: ld.free for iid, ld in loads.items() if iid not in drop.voters}
        dst = max(free, key=lambda i: (free[i], i), default=None)
        if not voters or dst is None or free[dst] <= 0:
            self._fallback(now, wall, "no instance has free blocks to migrate into")
            return None
        src = voters[0]
        on_src = [rid for rid, iid in serving.items() if iid == src]
        if not on_src:
            self._fallback(now, wall, f"no placed request runs on {src}")
            return None
        pick = Migration(on_src[-1], src, dst)
        self.elastic.note_controller(
            "migrate-plan", now, wall, request_id=pick.request_id, src=src, dst=dst
        )
        return pick

    def _fallback(self, now: float, wall: float, why: str, **detail: Any) -> None:
        self.elastic.note_controller(
            "fallback",
            now,
            wall,
            reason=f"{why}: KV-centric preemption on the instances",
            **detail,
        )

    def status(self, now: float) -> dict[str, Any]:
        return {
            "on": self.enabled,
            "strategy": self.strategy,
            "exchange": self.exchange,
            "restore": self.restore,
            "max_group": self.max_group,
            **self.monitor.status(now),
        }


@dataclass(frozen=True)
class Migration:
    request_id: str
    src: str
    dst: str
