"""The scheduler's elastic timeline during a replay, and what it says per group.

`TimelineSampler` (the shell) reads `memserve admin elastic status` every `poll_s` while
the load runs and, while a group serves, its leader's status (the exchanger's figures:
requests exchanged, bytes, the leader's stall from commit to join; kept by the leader
until the restore, so the last sample of a group is its final word). One last read when
the replay ends. `summarize_timeline` (pure) turns the events into:

- per group: members, drop (prepare -> serving) and restore (restoring -> dissolved)
  seconds, when it served, was wanted back, dissolved or broke, its lifetime (serving -> dissolved / broken / the replay's end,
  `open` when it outlived the replay), requests adopted, bytes lent, the exchange's
  figures and the restore's (requests moved / recomputed, bytes moved, pause);
- totals: drops, aborts, breaks, restores, fallbacks, migrations, votes, exchanged bytes
  and requests, the largest exchange stall, group-seconds.

Times are seconds from the replay's start (the scheduler's wall clock minus the load
client's; one machine, one clock), as the requests' `sent_s` are.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

CONTROLLER = "-"  # the group column of the controller's events (services/scheduler/elastic.py)


class TimelineSampler:
    def __init__(self, cluster: Any, poll_s: float = 0.25):
        self.cluster = cluster
        self.poll_s = poll_s
        self.events: list[dict[str, Any]] = []
        self.groups: list[dict[str, Any]] = []
        self.controller: dict[str, Any] = {}
        self.exchange: dict[str, dict[str, Any]] = {}  # group id -> leader's last figures
        self.errors: list[str] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> TimelineSampler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def stop(self) -> None:
        """End the polling and read the timeline once more (what the last poll missed)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.sample(), 10)

    async def _loop(self) -> None:
        while True:
            try:
                await self.sample()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a slow or restarting scheduler: try again
                if len(self.errors) < 10:
                    self.errors.append(str(exc) or type(exc).__name__)
            await asyncio.sleep(self.poll_s)

    async def sample(self) -> None:
        reply = await self.cluster.admin("elastic", "status", timeout_s=5.0)
        if not reply.ok:
            raise RuntimeError(f"elastic status: {reply.error}")
        st = dict(reply.result)
        self.events = list(st.get("events") or [])
        self.groups = list(st.get("groups") or [])
        self.controller = dict(st.get("controller") or {})
        for g in self.groups:
            if g.get("state") == "SERVING":
                gid = str(g["group_id"])
                leader = await self._elastic_status(str(g.get("leader", "")))
                figures = dict(leader.get("exchange") or {})
                stages = {}  # each member's stage: busy and elapsed seconds (bubbles)
                for m in g.get("members") or []:
                    iid = str(m.get("instance_id", ""))
                    st = leader if iid == g.get("leader") else await self._elastic_status(iid)
                    if st.get("stage"):
                        stages[iid] = dict(st["stage"])
                if figures or stages:
                    self.exchange[gid] = {**self.exchange.get(gid, {}), **figures}
                    if stages:
                        self.exchange[gid]["stages"] = stages

    async def _elastic_status(self, iid: str) -> dict[str, Any]:
        """A worker's `elastic` status ({} when it does not answer)."""
        from common.admin_client import admin_call

        if not iid:
            return {}
        control = self.cluster.endpoints(iid)["control"]
        reply = await admin_call(control, self.cluster.admin_token, "status", timeout_s=5.0)
        if not reply.ok:
            return {}
        return dict(reply.result.get("elastic") or {})

    def summary(self, t0_wall: float, end_wall: float) -> dict[str, Any]:
        out = summarize_timeline(self.events, t0_wall, end_wall, self.exchange)
        out["controller"] = {
            k: self.controller.get(k) for k in ("on", "strategy", "exchange", "restore")
        }
        if self.errors:
            out["sampler_errors"] = self.errors
        return out


def bubbles(stages: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Each stage's bubble ratio, 1 - busy / elapsed, from its last figures while the
    group served (members in rank order as the status lists them)."""
    out = {}
    for iid, st in stages.items():
        busy, elapsed = float(st.get("busy_s", 0.0)), float(st.get("elapsed_s", 0.0))
        if elapsed > 0:
            out[iid] = round(max(0.0, 1.0 - busy / elapsed), 4)
    return out


def _nan_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def summarize_timeline(
    events: Sequence[Mapping[str, Any]],
    t0_wall: float,
    end_wall: float,
    exchange: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The timeline relative to `t0_wall`, per group and in total (see the module doc);
    missing times are None."""
    exchange = exchange or {}

    def t(e: Mapping[str, Any]) -> float:
        return round(float(e["wall"]) - t0_wall, 4)

    timeline: list[dict[str, Any]] = [
        {
            "t_s": t(e),
            "event": str(e["event"]),
            "group": "" if e.get("group_id") == CONTROLLER else str(e.get("group_id", "")),
            "detail": dict(e.get("detail") or {}),
        }
        for e in sorted(events, key=lambda e: float(e["wall"]))
    ]
    end_s = end_wall - t0_wall
    gids: list[str] = list(dict.fromkeys(e["group"] for e in timeline if e["group"]))
    groups = [_group(gid, timeline, end_s, exchange.get(gid) or {}) for gid in gids]
    count = {name: sum(e["event"] == name for e in timeline) for name in _COUNTED}
    served = [g for g in groups if g["serving_s"] is not None]
    stalls = [float(g["exchange"].get("stall_s_max", 0.0)) for g in served if g["exchange"]]
    return {
        "timeline": timeline,
        "groups": groups,
        "drops": count["serving"],
        "aborted": count["aborted"],
        "broken": count["broken"],
        "restores": count["dissolved"],
        "fallbacks": count["fallback"],
        "migrations": count["migrated"],
        "migrate_failed": count["migrate-failed"],
        "votes": count["votes"],
        "exchanged_requests": sum(int(g["exchange"].get("exchanged", 0)) for g in served),
        "exchanged_bytes": sum(int(g["exchange"].get("bytes", 0)) for g in served),
        # Requests running at a drop that the group recomputed instead (no exchange, or a
        # failed or late batch).
        "drop_recomputed_requests": sum(int(g["exchange"].get("recomputed", 0)) for g in served),
        "exchange_stall_s_max": max(stalls) if stalls else None,
        "restore_moved_bytes": sum(int(g["restore"].get("moved_bytes", 0)) for g in served),
        "group_s": round(sum(g["lifetime_s"] or 0.0 for g in served), 4),
    }


_COUNTED = (
    *("serving", "aborted", "broken", "dissolved"),
    *("fallback", "migrated", "migrate-failed", "votes"),
)


def _group(
    gid: str, timeline: list[dict[str, Any]], end_s: float, exchange: Mapping[str, Any]
) -> dict[str, Any]:
    own = [e for e in timeline if e["group"] == gid]

    def at(name: str) -> float:
        return next((e["t_s"] for e in own if e["event"] == name), math.nan)

    def detail(name: str) -> dict[str, Any]:
        return next((e["detail"] for e in own if e["event"] == name), {})

    wanted = next(
        (
            e["t_s"]
            for e in timeline
            if e["event"] == "restore-wanted" and e["detail"].get("group") == gid
        ),
        math.nan,
    )
    prepare, serving = at("prepare"), at("serving")
    dissolved, broken = at("dissolved"), at("broken")
    ended = dissolved if math.isfinite(dissolved) else broken
    is_open = math.isfinite(serving) and not math.isfinite(ended)
    lifetime = (end_s if is_open else ended) - serving
    served = detail("serving")
    restored = detail("dissolved")
    return {
        "group_id": gid,
        "members": list(detail("prepare").get("members") or []),
        "prepare_s": _nan_none(prepare),
        "serving_s": _nan_none(serving),
        "drop_s": _nan_none(serving - prepare),
        "restore_wanted_s": _nan_none(wanted),
        "restoring_s": _nan_none(at("restoring")),
        "restore_s": _nan_none(dissolved - at("restoring")),
        "dissolved_s": _nan_none(dissolved),
        "broken_s": _nan_none(broken),
        "aborted": any(e["event"] == "aborted" for e in own),
        "open": is_open,
        "lifetime_s": _nan_none(round(lifetime, 4)),
        "bubble": bubbles(exchange.get("stages") or {}),
        "adopted": served.get("adopted"),
        "freed_bytes": served.get("freed_bytes"),
        "exchange": dict(exchange),
        "restore": {
            k: restored[k]
            for k in ("moved", "recomputed", "moved_bytes", "pause_s")
            if k in restored
        },
    }
