"""The scheduler's Prometheus metrics (common/metrics.py): placements as they are made
(`placed`, inline), and every REFRESH_S from the core's state (`refresh`): instances per
role and state, requests charged, and KunServe's pipeline groups.

KunServe: `memserve:kunserve_groups{state}` counts the groups the scheduler remembers by
state (FORMING | SERVING | RESTORING active; DISSOLVED | BROKEN the last few finished),
`memserve:kunserve_lent_bytes` the parameter bytes the active groups dropped and lent to
the KV cache, `memserve:kunserve_exchanges_total{kind}` the parameter exchanges done: a
`drop` when a group starts serving, a `restore` when one dissolves (each seen once).
"""

from __future__ import annotations

from common.metrics import TOKEN_BUCKETS, Metrics
from common.protocol.scheduler import Placement
from services.scheduler.core import GlobalScheduler
from services.scheduler.elastic import ACTIVE, DISSOLVED


class SchedulerMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__()
        self.placements = self.counter(
            "memserve:scheduler_placements_total",
            "Requests placed, by routing policy and the role of the instance chosen "
            "(a P/D request counts once for its prefill and once for its decode instance).",
            ["policy", "role"],
        )
        self.hit_tokens = self.histogram(
            "memserve:scheduler_hit_tokens",
            "Prompt tokens the global trees expected cached at the chosen instance.",
            TOKEN_BUCKETS,
            ["policy"],
        )
        self.instances = self.gauge(
            "memserve:scheduler_instances",
            "Registered instances, by role and state (up | drained | unhealthy).",
            ["role", "state"],
        )
        self.inflight = self.gauge(
            "memserve:scheduler_requests_charged", "Placements not yet released."
        )
        self.groups = self.gauge(
            "memserve:kunserve_groups", "KunServe pipeline groups, by state.", ["state"]
        )
        self.lent_bytes = self.gauge(
            "memserve:kunserve_lent_bytes",
            "Parameter bytes the active groups dropped, lent to the KV cache.",
        )
        self.exchanges = self.counter(
            "memserve:kunserve_exchanges_total",
            "Parameter exchanges done: drop (a group formed) | restore (it dissolved).",
            ["kind"],
        )
        self._seen: dict[str, set[str]] = {"drop": set(), "restore": set()}

    def placed(self, p: Placement, first_role: str, decode_role: str | None) -> None:
        self.placements.inc(policy=p.policy, role=first_role)
        if decode_role is not None:
            self.placements.inc(policy=p.policy, role=decode_role)
        self.hit_tokens.observe(p.cached_tokens, policy=p.policy)

    def refresh(self, core: GlobalScheduler) -> None:
        reg = core.registry
        counts: dict[tuple[str, str], int] = {}
        for inst in reg.instances():
            key = (inst.role, reg.state(inst))
            counts[key] = counts.get(key, 0) + 1
        self.instances.replace(({"role": r, "state": s}, n) for (r, s), n in counts.items())
        self.inflight.set(len(core.charges))
        groups = list(core.elastic.groups.values())
        by_state: dict[str, int] = {}
        for g in groups:
            by_state[g.state] = by_state.get(g.state, 0) + 1
        self.groups.replace(({"state": s}, n) for s, n in by_state.items())
        self.lent_bytes.set(sum(g.freed_bytes for g in groups if g.state in ACTIVE))
        ids = {g.group_id for g in groups}
        for g in groups:
            if g.formed_at and g.group_id not in self._seen["drop"]:
                self._seen["drop"].add(g.group_id)
                self.exchanges.inc(kind="drop")
            if g.state == DISSOLVED and g.group_id not in self._seen["restore"]:
                self._seen["restore"].add(g.group_id)
                self.exchanges.inc(kind="restore")
        for seen in self._seen.values():  # a pruned group never comes back
            seen &= ids
