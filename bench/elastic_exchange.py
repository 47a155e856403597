"""`memserve bench elastic --phases exchange`: what the live KV exchange at a drop saves
against recomputing the requests that were running (the `kunserve-recompute` ablation).

Each round starts `running` requests (round-robin: half on each instance), waits until
each has streamed a few tokens, drops `colocated-0,colocated-1` with exchange or with
`recompute`, lets the requests finish in the group, reads the leader's exchange figures
and restores. Rounds alternate which case goes first, so machine noise hits both alike.

The stall of a request is seen by the client: the largest gap between two consecutive
token chunks from the gateway around the drop (the gap spans the moment the drop was sent
or ends before the command returned, or lies between the two: an exchanged request
stalls from its export to its join, a recomputed one from its export to its first token
after the group recomputed its prompt and the tokens so far). The gap between tokens
before the drop is given for scale.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from bench.elastic_cluster import MEMBERS, MIB, Bench, Options, Stream, _stats, prompt, settings
from bench.report import fmt

CASES = ("exchange", "recompute")


@dataclass(frozen=True)
class ExchangeOptions:
    rounds: int = 3  # drops per case
    running: int = 4  # requests running at each drop (both instances)
    prompt_tokens: int = 256
    max_tokens: int = 192
    warm_tokens: int = 8  # each request has streamed this many before the drop


def stall_s(arrivals: list[float], t0: float, t1: float) -> float:
    """The largest gap between consecutive arrivals whose span meets [t0, t1]; nan if
    no gap does (the request ended before the drop)."""
    gaps = [b - a for a, b in itertools.pairwise(arrivals) if b >= t0 and a <= t1]
    return max(gaps) if gaps else float("nan")


def gap_before_s(arrivals: list[float], t0: float) -> float:
    """The median gap between consecutive arrivals before `t0` (nan: fewer than two)."""
    before = [a for a in arrivals if a < t0]
    gaps = [b - a for a, b in itertools.pairwise(before)]
    return statistics.median(gaps) if gaps else float("nan")


async def drop_once(b: Bench, xo: ExchangeOptions, case: str) -> dict[str, Any]:
    """One drop of `case` with `xo.running` requests running: per request its stall,
    and the leader's exchange figures; the group is restored before returning."""
    streams = []
    for _ in range(xo.running):
        b.seed += 1
        streams.append(Stream(b.client, prompt(xo.prompt_tokens, b.seed), xo.max_tokens))
    deadline = time.monotonic() + 120
    while not all(s.tokens >= xo.warm_tokens or s.task.done() for s in streams):
        if time.monotonic() > deadline:
            raise RuntimeError(f"requests did not start: {[s.tokens for s in streams]}")
        await asyncio.sleep(0.005)
    running = sum(not s.task.done() for s in streams)
    t0 = time.perf_counter()
    args = ["elastic", "drop", ",".join(MEMBERS)] + (["recompute"] if case == "recompute" else [])
    group = await b.admin(*args)
    t1 = time.perf_counter()
    finals = [await s.done() for s in streams]
    leader = await b.worker_status(MEMBERS[0])  # figures kept until the restore
    exchange = dict(leader["elastic"].get("exchange") or {})
    await b.admin("elastic", "restore", group["group_id"])
    return {
        "case": case,
        "group_id": group["group_id"],
        "drop_s": t1 - t0,
        "running": running,
        "started_on": [f.instances[0] if f.instances else "" for f in finals],
        "stall_s": [stall_s(s.arrivals, t0, t1) for s in streams],
        "gap_before_s": [gap_before_s(s.arrivals, t0) for s in streams],
        "tpot_s": [f.tpot_s for f in finals],
        "exchange": exchange,
    }


async def measure_exchange(opts: Options, xo: ExchangeOptions) -> dict[str, Any]:
    """Its own cluster (round-robin, so the requests split over both instances)."""
    from common.client import GatewayClient
    from services.launcher.supervisor import Cluster

    token = secrets.token_hex(8)
    with tempfile.TemporaryDirectory(prefix="memserve-elastic-x-") as tmp:
        run_dir = f"{opts.run_dir}/exchange" if opts.run_dir else tmp
        cfg = settings(opts, run_dir, token, {"scheduler": {"policy": "round-robin"}})
        async with Cluster(cfg) as cluster:
            client = GatewayClient(cluster.gateway, timeout_s=120)
            try:
                b = Bench(cluster, client, token, opts)
                for s in [Stream(client, b.next_prompt(), 8) for _ in MEMBERS]:
                    await s.done()
                drops = []
                for r in range(xo.rounds):
                    for case in CASES if r % 2 == 0 else CASES[::-1]:
                        drops.append(await drop_once(b, xo, case))
                        await asyncio.sleep(0.3)  # the restore's reloads settle
            finally:
                client.close()
    return summarize_exchange(xo, drops)


def _finite(xs: list[float]) -> list[float]:
    return [x for x in xs if x == x]


def summarize_exchange(xo: ExchangeOptions, drops: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"options": xo.__dict__, "drops": drops}
    for case in CASES:
        ds = [d for d in drops if d["case"] == case]
        ex = [d["exchange"] for d in ds]
        out[case] = {
            "drops": len(ds),
            "running": sum(d["running"] for d in ds),
            "stall_s": _stats(_finite([x for d in ds for x in d["stall_s"]])),
            "gap_before_s": _stats(_finite([x for d in ds for x in d["gap_before_s"]])),
            "tpot_s": _stats([x for d in ds for x in d["tpot_s"]]),
            "drop_s": _stats([d["drop_s"] for d in ds]),
            "exchanged": sum(int(e.get("exchanged", 0)) for e in ex),
            "recomputed": sum(int(e.get("recomputed", 0)) for e in ex),
            "bytes": _stats([float(e.get("bytes", 0)) for e in ex]),
            "batches": _stats([float(e.get("batches", 0)) for e in ex]),
            "copy_s": _stats([float(e.get("copy_s", 0.0)) for e in ex]),
            "leader_stall_s_max": _stats([float(e.get("stall_s_max", 0.0)) for e in ex]),
            "took_s": _stats([float(e.get("took_s", 0.0)) for e in ex]),
        }
    return out


def _ms(s: dict[str, float], key: str = "median") -> str:
    return fmt(1e3 * s[key], 1) if s["n"] else "-"


EXCHANGE_HEADERS = ["metric", "exchange", "recompute", "ratio"]


def exchange_rows(res: dict[str, Any]) -> list[list[str]]:
    x, r = res["exchange"], res["recompute"]

    def ratio(a: float, b: float) -> str:
        return fmt(b / a, 2) if a and a == a and b == b else "-"

    rows = [
        ["drops / requests running at them", f"{x['drops']} / {x['running']}",
         f"{r['drops']} / {r['running']}", "-"],
        ["client stall ms, median", _ms(x["stall_s"]), _ms(r["stall_s"]),
         ratio(x["stall_s"]["median"], r["stall_s"]["median"])],
        ["client stall ms, max", _ms(x["stall_s"], "max"), _ms(r["stall_s"], "max"),
         ratio(x["stall_s"]["max"], r["stall_s"]["max"])],
        ["gap between tokens before the drop ms, median", _ms(x["gap_before_s"]),
         _ms(r["gap_before_s"]), "-"],
        ["TPOT ms of those requests, median", _ms(x["tpot_s"]), _ms(r["tpot_s"]), "-"],
        ["drop command ms, median", _ms(x["drop_s"]), _ms(r["drop_s"]), "-"],
        ["leader: exchanged / recomputed requests", f"{x['exchanged']} / {x['recomputed']}",
         f"{r['exchanged']} / {r['recomputed']}", "-"],
        ["leader: KV exchanged MiB per drop, median",
         fmt(x["bytes"]["median"] / MIB, 2) if x["bytes"]["n"] else "-",
         fmt(r["bytes"]["median"] / MIB, 2) if r["bytes"]["n"] else "-", "-"],
        ["leader: batches per drop, median", fmt(x["batches"]["median"], 1),
         fmt(r["batches"]["median"], 1), "-"],
        ["leader: copy ms per drop, median", _ms(x["copy_s"]), _ms(r["copy_s"]), "-"],
        ["leader: stall commit->join ms, max", _ms(x["leader_stall_s_max"], "max"),
         "-", "-"],
        ["leader: exchange took ms, median", _ms(x["took_s"]), "-", "-"],
    ]  # fmt: skip
    return rows
