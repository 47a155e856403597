"""`memserve bench elastic --phases auto`: one run of KunServe's automatic controller,
nothing commanded, and its timeline.

Its own cluster (2 colocated instances, `[scheduler] elastic_auto = true`, round-robin,
thresholds as in tests/test_kunserve_auto.py: drop at 0.8 usage, short window, cooldown
and minimum group age, heartbeats every 0.1 s). A burst of `burst` long requests fills
both instances' KV and leaves a queue; the controller votes, plans and drops. Once the
group serves, `trickle` short requests run at a time (each replaced when it ends) until
the group has restored by itself, so some requests run across the restore.

Figures (wall clock: the scheduler's events and the client's arrivals on one machine,
relative to the burst's start): first `votes` -> the drop's `serving`; `serving` -> the
first token of the first request sent after it; `votes` -> the first token of the first
burst request that had queued until the group served it; `restore-wanted` -> `dissolved`; the TPOT
of the requests running across the restore (first token before `restore-wanted`, last
after `dissolved`) and their largest gap between tokens, beside the TPOT of the requests
that ran wholly in the group. The controller's timeline is printed and saved.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from bench.elastic_cluster import MEMBERS, MIB, Stream, _stats, param_bytes, prompt
from bench.elastic_exchange import stall_s
from bench.report import fmt


@dataclass(frozen=True)
class AutoOptions:
    model: str = "tiny"
    kv_mib: float = 3.0  # tiny: 96 blocks of 16 tokens per instance
    burst: int = 12
    burst_tokens: int = 290
    trickle: int = 2  # requests at a time after the drop
    trickle_tokens: int = 40
    timeout_s: float = 120.0  # for the drop, and again for the restore


def auto_settings(ao: AutoOptions, run_dir: str, token: str) -> Any:
    from services.launcher.config import load

    return load(
        None,
        {
            "cluster": {
                "run_dir": run_dir,
                "admin_token": token,
                "model": ao.model,
                "mode": "colocated",
                "colocated": len(MEMBERS),
                "restart": False,
            },
            "scheduler": {
                "heartbeat_timeout_s": 1.5,
                "policy": "round-robin",  # the burst splits evenly
                "elastic_auto": True,
                # Under preemption usage saws below full: 0.95 would hold only part of
                # the time (tests/test_kunserve_auto.py).
                "elastic_drop_usage": 0.8,
                "elastic_window": 5,
                "elastic_cooldown_s": 1.0,
                "elastic_min_group_s": 1.0,
            },
            "gateway": {"request_timeout_s": 120},
            "worker": {
                "heartbeat_interval_s": 0.1,
                "stage_timeout_s": 3.0,
                "engine": {"num_threads": 1},
            },
            "mempool": {
                "budget_bytes": param_bytes(ao.model) + int(ao.kv_mib * MIB),
                "tensor_memory_bytes": 1 << 20,
            },
        },
    )


class Run:
    def __init__(self, cluster: Any, client: Any, token: str, ao: AutoOptions):
        self.c = cluster
        self.client = client
        self.token = token
        self.ao = ao
        self.seed = 1000

    async def status(self) -> dict[str, Any]:
        from common.admin_client import admin_call

        reply = await admin_call(self.c.admin_address, self.token, "elastic", ["status"], 30)
        if not reply.ok:
            raise RuntimeError(f"elastic status: {reply.error}")
        return dict(reply.result)

    async def until(self, pred: Any, what: str) -> None:
        deadline = time.monotonic() + self.ao.timeout_s
        while True:
            st = await self.status()
            if pred(st["groups"]):
                return
            if time.monotonic() > deadline:
                tail = [(e["event"], e.get("detail", {})) for e in st["events"][-10:]]
                raise RuntimeError(f"timed out waiting for {what}: {st['groups']} {tail}")
            await asyncio.sleep(0.05)

    def stream(self, n_prompt: int, max_tokens: int) -> Stream:
        self.seed += 1
        return Stream(self.client, prompt(n_prompt, self.seed), max_tokens)


async def measure_auto(ao: AutoOptions, run_dir: str = "") -> dict[str, Any]:
    from common.client import GatewayClient
    from services.launcher.supervisor import Cluster

    token = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="memserve-elastic-auto-") as tmp:
        async with Cluster(auto_settings(ao, run_dir or tmp, token)) as cluster:
            client = GatewayClient(cluster.gateway, timeout_s=120)
            try:
                return await _auto(Run(cluster, client, token, ao))
            finally:
                client.close()


def _serving(gs: list[dict[str, Any]]) -> bool:
    return any(g["state"] == "SERVING" for g in gs)


def _dissolved(gs: list[dict[str, Any]]) -> bool:
    return bool(gs) and all(g["state"] == "DISSOLVED" for g in gs)


async def _auto(r: Run) -> dict[str, Any]:
    ao = r.ao
    for s in [r.stream(20, 8) for _ in MEMBERS]:  # both instances warm
        await s.done()
    await asyncio.sleep(0.5)  # heartbeats report the idle instances
    wall0, perf0 = time.time(), time.perf_counter()
    burst = [r.stream(30 + k % 12, ao.burst_tokens) for k in range(ao.burst)]
    await r.until(_serving, "a drop by itself")
    trickle: list[Stream] = []
    while not _dissolved((await r.status())["groups"]):
        if time.perf_counter() - perf0 > 2 * ao.timeout_s:
            raise RuntimeError("the group did not restore by itself")
        while sum(not s.task.done() for s in trickle) < ao.trickle:
            trickle.append(r.stream(25, ao.trickle_tokens))
        await asyncio.sleep(0.05)
    finals = [await s.done() for s in burst + trickle]
    events = (await r.status())["events"]
    return summarize_auto(ao, wall0, perf0, burst, trickle, finals, events)


def _first(events: list[dict[str, Any]], name: str, gid: str | None = None) -> float:
    """Wall clock of the first `name` event (of group `gid`), nan if none."""
    for e in events:
        if e["event"] == name and (gid is None or e["group_id"] == gid):
            return float(e["wall"])
    return float("nan")


def summarize_auto(
    ao: AutoOptions,
    wall0: float,
    perf0: float,
    burst: list[Stream],
    trickle: list[Stream],
    finals: list[Any],
    events: list[dict[str, Any]],
) -> dict[str, Any]:
    def wall(p: float) -> float:  # a client perf_counter stamp on the scheduler's clock
        return wall0 + (p - perf0)

    events = [e for e in events if e["wall"] >= wall0 - 1.0]
    gid = next((e["group_id"] for e in events if e["event"] == "serving"), "")
    votes = _first(events, "votes")
    prepare, serving = _first(events, "prepare", gid), _first(events, "serving", gid)
    wanted = next(
        (
            float(e["wall"])
            for e in events
            if e["event"] == "restore-wanted" and e.get("detail", {}).get("group") == gid
        ),
        float("nan"),
    )
    dissolved = _first(events, "dissolved", gid)
    new_first = wall(trickle[0].first_at) if trickle else float("nan")
    # Admitted by the group: first token after it serves (one between Prepare and serving
    # came from a member still stepping alone before its pause).
    queued = [wall(s.first_at) for s in burst if wall(s.first_at) > serving]
    queued_first = min(queued) if queued else float("nan")
    across = [
        (s, f)
        for s, f in zip(burst + trickle, finals, strict=True)
        if s.arrivals and wall(s.arrivals[0]) < wanted and wall(s.arrivals[-1]) > dissolved
    ]
    in_group = [
        f
        for s, f in zip(trickle, finals[len(burst) :], strict=True)
        if s.arrivals and wall(s.arrivals[0]) > serving and wall(s.arrivals[-1]) < wanted
    ]
    p_wanted, p_dissolved = perf0 + (wanted - wall0), perf0 + (dissolved - wall0)
    client = [
        {"wall": wall0, "event": "client: burst sent", "detail": {"requests": ao.burst}},
        {
            "wall": queued_first,
            "event": "client: first token of a burst request the group admitted",
        },
        {"wall": new_first, "event": "client: first new request's first token"},
        {"wall": wall(max(s.arrivals[-1] for s in burst)), "event": "client: burst's last token"},
    ]
    timeline = sorted(
        [
            {
                "t_s": round(float(e["wall"]) - wall0, 4),
                "event": e["event"],
                "group": e.get("group_id", ""),
                "detail": e.get("detail", {}),
            }
            for e in events + client
            if e["wall"] == e["wall"]
        ],
        key=lambda e: e["t_s"],
    )
    return {
        "options": ao.__dict__,
        "group_id": gid,
        "votes_to_serving_s": serving - votes,
        "votes_to_prepare_s": prepare - votes,
        "serving_to_first_new_token_s": new_first - serving,
        "votes_to_first_new_token_s": new_first - votes,
        "votes_to_first_queued_token_s": queued_first - votes,
        "burst_first_served_by_group": len(queued),
        "restore_wanted_to_dissolved_s": dissolved - wanted,
        "across_restore": {
            "requests": len(across),
            "tpot_s": _stats([f.tpot_s for _, f in across]),
            "stall_s": _stats([stall_s(s.arrivals, p_wanted, p_dissolved) for s, _ in across]),
        },
        "in_group_tpot_s": _stats([f.tpot_s for f in in_group]),
        "trickle_requests": len(trickle),
        "timeline": timeline,
    }


def _s(x: float, digits: int = 3) -> str:
    return fmt(x, digits)


AUTO_HEADERS = ["figure", "value"]


def auto_rows(res: dict[str, Any]) -> list[list[str]]:
    a = res["across_restore"]
    return [
        ["first votes -> drop prepare s", _s(res["votes_to_prepare_s"])],
        ["first votes -> group serving s", _s(res["votes_to_serving_s"])],
        ["burst requests first served by the group (queued until then)",
         f"{res['burst_first_served_by_group']} of {res['options']['burst']}"],
        ["first votes -> the first of those first tokens s",
         _s(res["votes_to_first_queued_token_s"])],
        ["group serving -> first new request's first token s",
         _s(res["serving_to_first_new_token_s"])],
        ["first votes -> first new request's first token s",
         _s(res["votes_to_first_new_token_s"])],
        ["restore-wanted -> dissolved s", _s(res["restore_wanted_to_dissolved_s"])],
        ["requests running across the restore", str(a["requests"])],
        ["  their TPOT ms, median (max)",
         f"{fmt(1e3 * a['tpot_s']['median'], 1)} ({fmt(1e3 * a['tpot_s']['max'], 1)})"
         if a["requests"] else "-"],
        ["  their largest gap around the restore ms, median (max)",
         f"{fmt(1e3 * a['stall_s']['median'], 1)} ({fmt(1e3 * a['stall_s']['max'], 1)})"
         if a["requests"] else "-"],
        ["TPOT ms of new requests wholly in the group, median",
         fmt(1e3 * res["in_group_tpot_s"]["median"], 1)],
    ]  # fmt: skip


TIMELINE_HEADERS = ["t s", "event", "group", "detail"]


def _detail(d: dict[str, Any]) -> str:
    keep = ("voters", "groups", "took_s", "adopted", "num_blocks", "used_blocks",
            "held_blocks", "moved", "recomputed", "pause_s", "requests", "reason")  # fmt: skip
    text = ", ".join(
        f"{k}={round(d[k], 3) if isinstance(d[k], float) else d[k]}" for k in keep if k in d
    )
    return text[:70]


def timeline_rows(res: dict[str, Any]) -> list[list[str]]:
    return [
        [fmt(e["t_s"], 3), e["event"], e["group"] or "-", _detail(e["detail"])]
        for e in res["timeline"]
    ]
